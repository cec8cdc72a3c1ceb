"""Two stream workers on the production stores: they split the partitions of each topic and
together write every event exactly once into Redis (online) through the Postgres registry.

The broker is the embedded Tansu (Kafka protocol, same clients as production); the Feast repo
is the production one (deploy/bootstrap.py assembles + applies it), run against native Redis and
PostgreSQL; the two workers share one state directory, as the compose/Kubernetes volumes do.
Expected values come straight from the published records, not from the worker's code.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the shared fixture modules

from trm import REPO_ROOT  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "deploy"))
import bootstrap  # noqa: E402

pytestmark = pytest.mark.integration

PARTITIONS = {"items": 2, "interactions": 4, "item_tokens": 2, "interactions_by_item": 4}
LOOP_TOPIC = {"items": "items", "interactions": "interactions", "item_stats": "interactions_by_item"}
HISTORY_LEN = 20


def _expected_users(interactions, n=HISTORY_LEN):
    """Final per-user features if every interaction is applied exactly once, in order."""
    users: dict[int, dict] = {}
    for it in interactions:
        st = users.setdefault(it.user_id, {"hist_item_ids": [], "user_n_events": 0, "user_n_positives": 0})
        st["user_n_events"] += 1
        if it.label:
            st["user_n_positives"] += 1
            st["hist_item_ids"] = (st["hist_item_ids"] + [it.item_id])[-n:]
    return users


def _owned(worker, topic: str) -> set[int]:
    consumer = worker.loops[topic].consumer  # None until the loop has built its processor
    return {tp.partition for tp in consumer.assignment()} if consumer is not None else set()


async def _stable_split(workers, topic: str, n_partitions: int, timeout: float = 60.0) -> list[set[int]]:
    """Wait until the group's assignment is final: disjoint, non-empty, covering every partition."""
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            w.raise_if_failed()
        owned = [_owned(w, topic) for w in workers]
        union = set().union(*owned)
        if all(owned) and sum(map(len, owned)) == len(union) == n_partitions:
            return owned
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}: partitions never split between the workers: {owned}")
        await asyncio.sleep(0.2)


async def _until(pred, what: str, workers, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for w in workers:
            w.raise_if_failed()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {[w.status() for w in workers]}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def two_workers_run(tmp_path_factory, redis_server, postgres_server, broker_module, ml_slice,  # noqa: F811
                    tiny_tokenizer):
    """Publish the MovieLens slice to two workers sharing a group; return what they and the store did."""
    from streams.app import StreamWorker, WorkerSettings
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.feast_sink import FeastSink
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_kind

    items, its = ml_slice
    tmp_path = tmp_path_factory.mktemp("two-workers")
    mp = pytest.MonkeyPatch()
    try:
        db = "reg_two_workers"
        postgres_server.psql(f'CREATE DATABASE "{db}"', db="postgres")
        for k, v in {"REDIS_HOST": redis_server.host, "REDIS_PORT": str(redis_server.port), "REDIS_OPTIONS": "",
                     "FEAST_REGISTRY_USER": postgres_server.user, "FEAST_REGISTRY_PASSWORD": "",
                     "FEAST_REGISTRY_HOST": postgres_server.host, "FEAST_REGISTRY_PORT": str(postgres_server.port),
                     "FEAST_REGISTRY_DB": db,
                     "TRM_TOPIC_PARTITIONS": ",".join(f"{k}={v}" for k, v in PARTITIONS.items())}.items():
            mp.setenv(k, v)
        cfg = KafkaConfig(bootstrap_servers=broker_module.bootstrap, session_timeout_ms=6000, topic_prefix="dw.")
        made = bootstrap.create_topics(cfg, replication=1, wait_s=30)
        assert made["dw.interactions"] == PARTITIONS["interactions"]
        repo = bootstrap.assemble_feature_repo(tmp_path / "feature_repo_prod")
        bootstrap.feast_apply(repo)
        state, pairs = tmp_path / "shared" / "stream", tmp_path / "shared" / "pairs"  # one shared volume

        def settings() -> WorkerSettings:
            return WorkerSettings(repo_path=repo, tokenizer_dir=tiny_tokenizer, state_dir=state, pairs_dir=pairs,
                                  kafka=cfg, history_len=HISTORY_LEN, app_id="trm-worker")

        item_events = sorted((ItemEvent.from_item(i) for i in items.values()), key=lambda e: (e.event_time, e.item_id))
        inter_events = [InteractionEvent.from_interaction(i) for i in its]

        async def scenario():
            a, b = StreamWorker(settings()), StreamWorker(settings())
            async with a, b:
                split = {t: await _stable_split([a, b], t, PARTITIONS[LOOP_TOPIC[t]]) for t in LOOP_TOPIC}
                await asyncio.to_thread(publish_kind, cfg, "items", item_events, progress=False)
                await _until(lambda: sum(w.loops["items"].counters.processed for w in (a, b)) >= len(item_events),
                             "all items tokenized", [a, b])
                await asyncio.to_thread(publish_kind, cfg, "interactions", inter_events, progress=False)
                await _until(lambda: sum(w.loops["interactions"].counters.processed for w in (a, b)) >= len(its)
                             and all(w.loops["interactions"].counters.parked == 0 for w in (a, b)),
                             "all interactions applied", [a, b])
                # every accepted interaction was forwarded once (no crash): counted once by item
                await _until(lambda: sum(w.loops["item_stats"].counters.processed for w in (a, b)) >= len(its),
                             "all interactions counted by item", [a, b])
                await asyncio.sleep(1.0)  # anything beyond the expected count (a duplicate) would show up now
                final_split = {t: [_owned(w, t) for w in (a, b)] for t in split}
                return split, final_split, a.status(), b.status()

        split, final_split, sa, sb = asyncio.run(scenario())
        yield {"split": split, "final_split": final_split, "status": (sa, sb), "repo": repo,
               "sink": FeastSink(repo), "item_events": item_events, "inter_events": inter_events}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def broker_module():
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


def test_two_workers_split_the_partitions(two_workers_run):
    split, sa, sb = two_workers_run["split"], *two_workers_run["status"]
    assert two_workers_run["final_split"] == split, "no rebalance happened while the events were processed"
    for loop, owned in split.items():
        assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(PARTITIONS[LOOP_TOPIC[loop]]))
    for s in (sa, sb):
        for loop in LOOP_TOPIC:
            assert s[loop]["processed"] > 0, f"both workers did {loop} work: {s}"


def test_together_every_event_is_processed_exactly_once(two_workers_run, ml_slice):
    items, its = ml_slice
    sa, sb = two_workers_run["status"]
    assert sa["items"]["processed"] + sb["items"]["processed"] == len(two_workers_run["item_events"])
    assert sa["interactions"]["processed"] + sb["interactions"]["processed"] == len(its)
    assert sa["item_stats"]["processed"] + sb["item_stats"]["processed"] == len(its)
    for s in (sa, sb):
        for loop in LOOP_TOPIC:
            assert s[loop]["dead_lettered"] == 0 and s[loop]["skipped"] == 0, s
        assert s["item_stats"]["duplicates"] == 0 and s["item_stats"]["folded"] == 0, s
    # each worker processed exactly the events of the partitions it owned
    from kafka.partitioner.default import murmur2  # the publisher's (Kafka's default) key hash

    per_partition = defaultdict(int)
    for ev in two_workers_run["inter_events"]:
        per_partition[(murmur2(str(ev.user_id).encode()) & 0x7FFFFFFF) % PARTITIONS["interactions"]] += 1
    for owned, s in zip(two_workers_run["split"]["interactions"], (sa, sb)):
        assert s["interactions"]["processed"] == sum(per_partition[p] for p in owned)


def test_store_holds_exactly_once_tokens_and_user_features(two_workers_run, ml_slice, tiny_tokenizer):  # noqa: F811
    """Redis via the Postgres registry: exact tokens and per-user features (one partition per user)."""
    from tokenizer.hybrid import HybridTokenizer

    items, its = ml_slice
    sink = two_workers_run["sink"]
    tok = HybridTokenizer.load(tiny_tokenizer)
    expected_tokens = dict(zip(items, tok.encode_texts([it.text() for it in items.values()])))
    online_items = sink.read_online("item_tokens", list(items))
    for iid, t in expected_tokens.items():
        assert online_items[iid]["gen_tokens"] == t.gen_tokens, iid
        assert online_items[iid]["mem_tokens"] == t.mem_tokens, iid
        assert online_items[iid]["tokenizer_version"] == tok.version
    expected_users = _expected_users(its)
    online_users = sink.read_online("user_history", list(expected_users),
                                    ["hist_item_ids", "user_n_events", "user_n_positives"])
    assert online_users == expected_users


def test_store_holds_exact_item_counters_across_workers(two_workers_run, ml_slice):
    """Item counters of a user-keyed stream, with the item's events spread over both workers: the
    interactions_by_item repartition puts every event of an item on one partition, one owner."""
    _, its = ml_slice
    assert len({it.item_id for it in its}) > 50
    counts = defaultdict(lambda: [0, 0])
    for it in its:
        counts[it.item_id][0] += 1
        counts[it.item_id][1] += it.label
    online = two_workers_run["sink"].read_online("item_stats", list(counts))
    wrong = {iid: (online[iid], c) for iid, c in counts.items()
             if [online[iid]["item_n_interactions"], online[iid]["item_n_positives"]] != c}
    assert not wrong, f"{len(wrong)} of {len(counts)} items have wrong counters, e.g. {list(wrong.items())[:3]}"


def _catches_sigterm(pid: int) -> bool:
    """Has the process installed a SIGTERM handler (SigCgt bit 15 in /proc/<pid>/status)?"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_compose_worker_command_runs_against_redis_and_postgres(tmp_path, redis_server, postgres_server,  # noqa: F811
                                                                broker_module, ml_slice, tiny_tokenizer,
                                                                monkeypatch):
    """The worker service's own command line (docker-compose.yml), env-configured, as a process:
    publish with `trm publish`, see the tokens in Redis, stop it with SIGTERM like `docker stop`."""
    import json
    import os
    import subprocess

    import yaml

    from streams.feast_sink import FeastSink
    from tokenizer.hybrid import HybridTokenizer

    items, _ = ml_slice
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    assert compose["entrypoint"] == ["sh", "-c"]
    db = "reg_compose_worker"
    postgres_server.psql(f'CREATE DATABASE "{db}"', db="postgres")
    env = {k: str(v) for k, v in compose["environment"].items()}
    env.update(os.environ)
    env.update({  # the compose service names -> the native services and the embedded broker
        "TRM_KAFKA_BOOTSTRAP": broker_module.bootstrap, "TRM_TOPIC_PREFIX": "cw.",
        "TRM_KAFKA_SESSION_TIMEOUT_MS": "6000", "TRM_TOPIC_PARTITIONS": "items=2,interactions=2,item_tokens=2",
        "REDIS_HOST": redis_server.host, "REDIS_PORT": str(redis_server.port),
        "FEAST_REGISTRY_HOST": postgres_server.host, "FEAST_REGISTRY_PORT": str(postgres_server.port),
        "FEAST_REGISTRY_USER": postgres_server.user, "FEAST_REGISTRY_PASSWORD": "", "FEAST_REGISTRY_DB": db,
        "TRM_FEAST_REPO": str(tmp_path / "feature_repo_prod"), "TRM_TOKENIZER_ARTIFACT": str(tiny_tokenizer),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    })
    # the init job's two steps, as its entrypoint runs them
    init = subprocess.run([sys.executable, str(REPO_ROOT / "deploy" / "bootstrap.py"), "all",
                           "--repo", env["TRM_FEAST_REPO"]], env=env, capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr[-3000:]
    assert "topic cw.interactions: 2 partitions (ok)" in init.stdout

    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(json.dumps({"item_id": it.item_id, "title": it.title, "text": it.text(),
                                              "categories": list(it.genres), "created_at": it.created_at,
                                              "event_time": it.created_at}) + "\n" for it in items.values()))
    pub = subprocess.run(["trm", "publish", "items", "--file", str(items_file), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert pub.returncode == 0 and f"published {len(items)} items events to cw.items" in pub.stdout, pub.stderr

    for k in ("REDIS_HOST", "REDIS_PORT", "REDIS_OPTIONS") + tuple(k for k in env if k.startswith("FEAST_REGISTRY_")):
        monkeypatch.setenv(k, env[k])  # this process reads the store too
    # compose turns `$$` into a literal `$` for the container's shell
    script = compose["command"][0].replace("$$", "$").replace("/var/lib/trm/state", str(tmp_path / "state"))
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(["sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    sink = FeastSink(env["TRM_FEAST_REPO"])
    try:
        deadline = time.monotonic() + 180
        while True:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            online = sink.read_online("item_tokens", list(items), ["gen_tokens", "tokenizer_version"])
            if all(v["gen_tokens"] is not None for v in online.values()):
                break
            assert time.monotonic() < deadline, f"tokens never reached Redis: {(tmp_path / 'worker.log').read_text()[-3000:]}"
            time.sleep(0.5)
        # Faust installs its SIGTERM handler late in start-up (a stop before that kills the process
        # outright: safe, offsets follow the Feast write, but not graceful); wait for it here.
        while not _catches_sigterm(worker.pid):
            assert time.monotonic() < deadline, "the worker never installed a SIGTERM handler"
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)  # what `docker stop` sends PID 1 (sh exec'd into trm)
        rc = worker.wait(timeout=60)
        log.close()
    assert rc == 0, (tmp_path / "worker.log").read_text()[-3000:]
    tok = HybridTokenizer.load(tiny_tokenizer)
    expected = dict(zip(items, tok.encode_texts([it.text() for it in items.values()])))
    assert {i: v["gen_tokens"] for i, v in online.items()} == {i: t.gen_tokens for i, t in expected.items()}
    assert {v["tokenizer_version"] for v in online.values()} == {tok.version}
    assert (tmp_path / "state" / "stream").is_dir(), "the worker keeps its state on the state volume"
