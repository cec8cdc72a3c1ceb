"""`trm serve` end to end: a real uvicorn server over HTTP, a real Feast repo, a small trained ranker.

Every test starts its own server (a fresh app, a fresh published-models directory) on the same
module-scoped repo and checkpoints, so none depends on another's state.
"""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.services import restart_redis, start_redis
from tests.trainer_fixtures import TOKENIZER_VERSION, event_stream, feature_rows, featurizer, make_repo, small_config

pytestmark = pytest.mark.integration
N_EVENTS, BATCH, MAX_CANDIDATES = 200, 100, 100
UNKNOWN_ITEMS = (9_999, 123_456)  # never written to the store


@dataclass
class World:
    repo: Path
    ckpts: list[Path]  # the trainer's checkpoints, oldest first
    items: list[int]  # items with tokens online
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from streams.feast_sink import FeastSink
    from trainer.learner import Learner, LearnerConfig
    from trainer.pit_join import FeastJoiner
    from trainer.prequential import ContinuousTrainer, run_events

    tmp = tmp_path_factory.mktemp("serve")
    events = event_stream(N_EVENTS)
    repo = make_repo(tmp, events)  # offline rows (the trainer's PIT join)
    sink = FeastSink(repo)
    for view, rows in feature_rows(events).items():  # and the online rows serving reads
        sink.write(view, rows, offline=False)
    cfg = small_config()
    tr = ContinuousTrainer(Learner(["trm"], cfg, LearnerConfig(minibatch=50)), FeastJoiner(str(repo)), featurizer(cfg),
                           tmp / "ckpt")
    assert run_events(tr, events, BATCH) == N_EVENTS
    ckpts = sorted((tmp / "ckpt").glob("ckpt-*"))
    assert len(ckpts) == 2
    return World(repo, ckpts, sorted({e.item_id for e in events}), tmp)


def publish(models_dir: Path, ckpt: Path, step: int) -> Path:
    from trainer.checkpoint import ModelPublisher

    return ModelPublisher(models_dir, every=1).publish(ckpt, step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Client:
    def __init__(self, port: int, app):
        self.port, self.app = port, app

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("content-type", "")
        return resp.status, json.loads(data) if "json" in ctype else data.decode()

    def rank(self, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/rank", body)

    def metric(self, name: str, **labels) -> float:
        return self.app.state.metrics.registry.get_sample_value(name, labels or None) or 0.0


@contextmanager
def serving(world: World, models_dir: Path, repo: Path | None = None, **kw):
    import uvicorn

    from trainer.serving.app import create_app

    kw.setdefault("poll_s", 0.1)
    app = create_app(repo or world.repo, models_dir, **kw)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: server.started, 20, "uvicorn to start")
        yield Client(port, app)
    finally:
        server.should_exit = True
        th.join(20)


def healthy(client: Client, version: str | None = None):
    st, body = client.request("GET", "/healthz")
    return st == 200 and (version is None or body["model_version"] == version) and body


def online_frame(repo: Path, user: int, items: list[int], event_time: int) -> pd.DataFrame:
    """The joined frame built here, independently of the server: the service's online read + the join's columns."""
    from feast import FeatureStore

    from trainer.featurizer import READS
    from trainer.pit_join import FEATURE_SERVICE

    store = FeatureStore(repo_path=str(repo))
    df = store.get_online_features(features=store.get_feature_service(FEATURE_SERVICE),
                                   entity_rows=[{"user_id": user, "item_id": i} for i in items]).to_df()
    out = pd.DataFrame({"user_id": user, "item_id": items, "label": 0, "event_time": event_time})
    for c in READS:
        out[c] = df[c] if c in df.columns else None
    return out


def direct_scores(version_dir: Path, frame: pd.DataFrame) -> np.ndarray:
    """Featurizer + personal_logit by hand (not trainer.evaluate.score)."""
    from trainer.evaluate import load_models
    from trainer.featurizer import Featurizer

    models, cfg, info = load_models(version_dir)
    model = models["trm"]
    batch, _ = Featurizer.for_config(cfg, info["tokenizer_version"], ngrams=False)(frame)
    with torch.no_grad():
        return torch.sigmoid(model.personal_logit(batch.select(model.inputs), batch.user_id)).numpy()


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    """One server on version v1 for the read-only tests."""
    models = tmp_path_factory.mktemp("served") / "models"
    publish(models, world.ckpts[0], 1)
    with serving(world, models, max_candidates=MAX_CANDIDATES) as client:
        wait_for(lambda: healthy(client, "v1"), what="v1 to load")
        yield client


def test_healthz_is_503_until_a_version_is_published_then_200(world, tmp_path):
    models = tmp_path / "models"
    with serving(world, models) as client:
        st, body = client.request("GET", "/healthz")
        assert st == 503 and "no version" in body["reason"], body
        st, body = client.rank({"user_id": 1, "item_ids": [1, 2]})
        assert st == 503 and "no version" in body["detail"], body
        publish(models, world.ckpts[0], 1)
        body = wait_for(lambda: healthy(client, "v1"), what="v1 to load")
        assert body["tokenizer_version"] == TOKENIZER_VERSION and body["model"] == "trm"
        st, body = client.rank({"user_id": 1, "item_ids": [1, 2]})
        assert st == 200 and body["model_version"] == "v1"
        st, text = client.request("GET", "/metrics")
        assert st == 200
        for name in ("trm_serve_request_seconds_bucket", "trm_serve_candidates_bucket",
                     "trm_serve_feature_read_seconds_bucket", "trm_serve_errors_total", "trm_serve_model_info"):
            assert name in text, name
        assert 'trm_serve_model_info{model="trm",step="1",tokenizer_version="test-tokenizer-v1",version="v1"} 1.0' in text
        assert client.metric("trm_serve_errors_total", kind="no_model") == 1


def test_ranking_equals_the_trainers_offline_scoring(world, served):
    from trainer.evaluate import load_models, score
    from trainer.pit_join import FeastJoiner

    user = 3
    items = world.items[:30] + list(UNKNOWN_ITEMS)
    st, body = served.rank({"user_id": user, "item_ids": items})
    assert st == 200, body
    assert body["model_version"] == "v1" and body["tokenizer_version"] == TOKENIZER_VERSION
    got = body["items"]
    assert sorted(x["item_id"] for x in got) == sorted(items)
    scores = [x["score"] for x in got]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    by_id = {x["item_id"]: x for x in got}
    assert all(by_id[i]["known"] for i in world.items[:30])
    assert not any(by_id[i]["known"] for i in UNKNOWN_ITEMS)  # no tokens online: scored, unknown token

    t = body["event_time"]
    version = served.app.state.registry.current.path
    models, cfg, info = load_models(version)
    feat = featurizer(cfg)
    want = score(models, online_frame(world.repo, user, items, t), feat)
    assert [by_id[i]["score"] for i in items] == [float(s) for s in want["score_trm"]]  # bit for bit
    assert [by_id[i]["known"] for i in items] == want["known"].tolist()
    np.testing.assert_allclose([by_id[i]["score"] for i in items],
                               direct_scores(version, online_frame(world.repo, user, items, t)), rtol=1e-6)
    # and `trm eval`'s path: the offline point-in-time join at the same second (latest rows = online rows)
    events = pd.DataFrame({"user_id": user, "item_id": items, "label": 0, "event_time": t})
    offline = score(models, FeastJoiner(str(world.repo))(events), feat)
    np.testing.assert_allclose([by_id[i]["score"] for i in items], offline["score_trm"], rtol=1e-6)


def test_latency_of_100_candidates(world, served):
    items = world.items[:MAX_CANDIDATES] + list(range(10_000, 10_000 + MAX_CANDIDATES - len(world.items)))
    assert len(items) == MAX_CANDIDATES == 100  # 60 items with tokens online, 40 without
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        st, body = served.rank({"user_id": 5, "item_ids": items})
        times.append(time.perf_counter() - t0)
        assert st == 200 and len(body["items"]) == len(items)
    p50, p95 = np.percentile(times, [50, 95])
    mean = lambda name: served.metric(f"{name}_sum") / max(served.metric(f"{name}_count"), 1)  # noqa: E731
    print(f"\n/rank with {len(items)} candidates over HTTP: p50 {p50 * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms "
          f"(mean feature read {mean('trm_serve_feature_read_seconds') * 1e3:.1f} ms, "
          f"featurize + score {mean('trm_serve_score_seconds') * 1e3:.1f} ms)")
    # a figure to read, not a target: latency goals belong in a benchmark (bench/), never in a timed test


def test_the_direct_online_read_equals_feasts_get_online_features(world):
    """OnlineFeatures calls the online store's online_read per view (not get_online_features): the frame
    must be the one get_online_features(service).to_df() gives, value for value and dtype for dtype, for
    known and unknown users and items, with and without the token cache (a subset of items cached)."""
    from trainer.serving.online import CachedOnlineFeatures, OnlineFeatures

    cached = {r["item_id"]: r for r in token_rows(world.items[:20])}
    readers = [OnlineFeatures(str(world.repo)), CachedOnlineFeatures(str(world.repo), cached)]
    t = int(time.time())
    for user in (3, 17, 987_654):  # the last has no row online
        for items in ([world.items[0]], world.items[:30] + list(UNKNOWN_ITEMS), list(UNKNOWN_ITEMS),
                      world.items[25:] + world.items[:5]):
            want = online_frame(world.repo, user, items, t)
            for r in readers:
                pd.testing.assert_frame_equal(r.read(user, items, t).frame, want)
    got = readers[1].read(3, world.items[15:25], t)
    assert (got.cache_hits, got.cache_misses) == (5, 5)
    # the poller re-resolves the service's views from the registry (off the request path): same frame after
    before = readers[0]._plan
    readers[0].refresh(ttl_s=0)
    assert readers[0]._plan is not before and readers[0]._plan.resolved_at > before.resolved_at
    pd.testing.assert_frame_equal(readers[0].read(3, world.items[:10], t).frame,
                                  online_frame(world.repo, 3, world.items[:10], t))


BAD = {
    "malformed JSON": (b'{"user_id": 1, "item_ids": [1,', "json_invalid"),
    "empty body": (b"", None),
    "not an object": (b"[1, 2]", None),
    "missing item_ids": ({"user_id": 1}, "item_ids"),
    "missing user_id": ({"item_ids": [1]}, "user_id"),
    "unknown field": ({"user_id": 1, "item_ids": [1], "k": 10}, "k"),
    "string user id": ({"user_id": "1", "item_ids": [1]}, "user_id"),
    "string item id": ({"user_id": 1, "item_ids": [1, "2"]}, "item_ids"),
    "float user id": ({"user_id": 1.0, "item_ids": [1]}, "user_id"),
    "float item id": ({"user_id": 1, "item_ids": [2.5]}, "item_ids"),
    "bool user id": ({"user_id": True, "item_ids": [1]}, "user_id"),
    "bool item id": ({"user_id": 1, "item_ids": [False]}, "item_ids"),
    "null item_ids": ({"user_id": 1, "item_ids": None}, "item_ids"),
    "item_ids a string": ({"user_id": 1, "item_ids": "1,2"}, "item_ids"),
    "negative id": ({"user_id": -1, "item_ids": [1]}, "user_id"),
    "id past int64": ({"user_id": 1, "item_ids": [2**64]}, "item_ids"),
    "empty list": ({"user_id": 1, "item_ids": []}, "item_ids"),
    "too many candidates": ({"user_id": 1, "item_ids": list(range(1, MAX_CANDIDATES + 2))}, "item_ids"),
    "duplicate candidates": ({"user_id": 1, "item_ids": [3, 4, 3]}, "item_ids"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_422_naming_what_is_wrong(served, case):
    payload, names = BAD[case]
    before = served.metric("trm_serve_errors_total", kind="bad_request")
    st, body = served.rank(payload)
    assert st == 422, (case, st, body)
    assert body["detail"], body
    if names is not None:
        assert names in json.dumps(body["detail"]), body
    assert served.metric("trm_serve_errors_total", kind="bad_request") == before + 1
    assert served.metric("trm_serve_errors_total", kind="internal") == 0


def test_hot_swap_under_load_fails_no_request(world, tmp_path):
    models = tmp_path / "models"
    publish(models, world.ckpts[0], 1)
    items = world.items[:40] + [UNKNOWN_ITEMS[0]]
    results: list[tuple[int, dict]] = []
    stop = threading.Event()
    with serving(world, models) as client:
        wait_for(lambda: healthy(client, "v1"), what="v1 to load")

        def load():
            while not stop.is_set():
                results.append(client.rank({"user_id": 7, "item_ids": items}))

        th = threading.Thread(target=load, daemon=True)
        th.start()
        wait_for(lambda: len(results) >= 5, what="requests on v1")
        publish(models, world.ckpts[1], 2)
        wait_for(lambda: sum(1 for _, b in results if b.get("model_version") == "v2") >= 5, what="requests on v2")
        stop.set()
        th.join(30)
        assert client.metric("trm_serve_model_swaps_total") == 2
    assert all(st == 200 for st, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [b["model_version"] for _, b in results]
    cut = versions.index("v2")
    assert set(versions[:cut]) == {"v1"} and set(versions[cut:]) == {"v2"}  # old, then new, never back
    # each response was scored entirely by the version it names
    want: dict[tuple[str, int], dict[int, float]] = {}
    for _, b in results:
        key = (b["model_version"], b["event_time"])
        if key not in want:
            s = direct_scores(models / key[0], online_frame(world.repo, 7, items, key[1]))
            want[key] = dict(zip(items, s.tolist()))
        np.testing.assert_allclose([x["score"] for x in b["items"]], [want[key][x["item_id"]] for x in b["items"]],
                                   rtol=1e-6)


def test_a_tampered_or_partial_version_is_refused_and_the_old_one_keeps_serving(world, tmp_path):
    from tokenizer.manifest import MANIFEST
    from trainer.checkpoint import write_pointer

    models = tmp_path / "models"
    publish(models, world.ckpts[0], 1)
    with serving(world, models) as client:
        wait_for(lambda: healthy(client, "v1"), what="v1 to load")
        # tampered after publishing, before the server loads it: staged, one byte flipped, then moved in
        staged = publish(tmp_path / "staging", world.ckpts[1], 7)
        weights = staged / "model.trm.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        shutil.copytree(staged, models / "v7")
        write_pointer(models, "v7")
        wait_for(lambda: client.metric("trm_serve_errors_total", kind="version_refused") == 1, what="v7 refused")
        st, body = client.rank({"user_id": 2, "item_ids": world.items[:5]})
        assert st == 200 and body["model_version"] == "v1"
        health = healthy(client, "v1")
        assert health and health["last_refused"]["version"] == "v7" and "sha256" in health["last_refused"]["reason"]

        # partial: a version directory without its manifest yet (a copier that is not atomic)
        good = publish(tmp_path / "staging2", world.ckpts[1], 8)
        (models / "v8").mkdir()
        for f in good.iterdir():
            if f.name != MANIFEST:
                shutil.copy2(f, models / "v8" / f.name)
        write_pointer(models, "v8")
        wait_for(lambda: client.metric("trm_serve_errors_total", kind="version_refused") == 2, what="v8 refused")
        time.sleep(0.3)  # a few polls: a refused version is not retried (nor counted) while unchanged
        assert client.metric("trm_serve_errors_total", kind="version_refused") == 2
        assert client.rank({"user_id": 2, "item_ids": world.items[:5]})[1]["model_version"] == "v1"
        shutil.copy2(good / MANIFEST, models / "v8" / MANIFEST)  # complete now: loaded on the next poll
        wait_for(lambda: healthy(client, "v8"), what="v8 to load once complete")
        assert client.rank({"user_id": 2, "item_ids": world.items[:5]})[1]["model_version"] == "v8"


def test_store_down_is_a_503_and_the_service_recovers_without_a_restart(world, tmp_path):
    cfg = yaml.safe_load((world.repo / "feature_store.yaml").read_text())
    db = world.repo / cfg["online_store"]["path"]
    table = f"{cfg['project']}_item_tokens"
    models = tmp_path / "models"
    publish(models, world.ckpts[0], 1)
    req = {"user_id": 4, "item_ids": world.items[:10]}

    def move(a: str, b: str) -> None:  # the online store loses a table (another connection, as an operator)
        with sqlite3.connect(db) as conn:
            conn.execute(f'ALTER TABLE "{a}" RENAME TO "{b}"')

    with serving(world, models) as client:
        wait_for(lambda: healthy(client, "v1"), what="v1 to load")
        st, before = client.rank(req)
        assert st == 200
        move(table, table + "_away")
        try:
            st, body = client.rank(req)
            assert st == 503 and "online feature read failed" in body["detail"] and "no such table" in body["detail"], body
            st, body = client.request("GET", "/healthz")
            assert st == 503 and "online feature read failed" in body["reason"], body
            assert client.metric("trm_serve_errors_total", kind="store_unavailable") == 1
        finally:
            move(table + "_away", table)
        st, after = client.rank(req)  # the same server, no restart
        assert st == 200 and after["model_version"] == "v1"
        assert sorted(x["item_id"] for x in after["items"]) == sorted(x["item_id"] for x in before["items"])
        assert healthy(client, "v1")
        assert client.metric("trm_serve_errors_total", kind="internal") == 0


def test_a_repo_that_cannot_be_opened_is_a_503_naming_it(world, tmp_path):
    models = tmp_path / "models"
    publish(models, world.ckpts[0], 1)
    missing = tmp_path / "no_repo"
    with serving(world, models, repo=missing) as client:
        wait_for(lambda: client.app.state.registry.current is not None, what="v1 to load")
        st, body = client.request("GET", "/healthz")
        assert st == 503 and str(missing) in body["reason"], body
        st, body = client.rank({"user_id": 1, "item_ids": [1]})
        assert st == 503 and str(missing) in body["detail"], body
        assert client.metric("trm_serve_errors_total", kind="internal") == 0


def test_cli_registers_serve():
    from trm.cli import build_parser

    args = build_parser().parse_args(["serve", "--repo", "r", "--models", "m", "--port", "9000"])
    assert (args.repo, args.models, args.model, args.host, args.port, args.max_candidates, args.poll_s) == \
        ("r", "m", "trm", "127.0.0.1", 9000, 1000, 2.0)
    assert args.token_cache == "off"
    args = build_parser().parse_args(["serve", "--token-cache", "kafka", "--bootstrap", "h:1"])
    assert (args.token_cache, args.bootstrap, args.token_topic) == ("kafka", "h:1", "item_tokens")


def test_redis_online_store_down_is_a_503_with_the_reason_and_recovers_when_it_is_back(world, tmp_path):
    """The production online store: redis-server SIGKILLed -> 503 naming the failure, restarted -> 200
    with the same scores, the same server (no restart). Persistent Redis (append-only, fsync always),
    so the restarted server has the rows again."""
    from streams.feast_sink import FeastSink
    from streams.feature_repo_tools import materialize_repo

    redis = start_redis(persistent=True)
    try:
        repo = materialize_repo(tmp_path / "redis_repo")
        conf = yaml.safe_load((repo / "feature_store.yaml").read_text())
        conf["online_store"] = {"type": "redis", "connection_string": redis.connection_string}
        (repo / "feature_store.yaml").write_text(yaml.safe_dump(conf))
        sink = FeastSink(repo)
        for view, rows in feature_rows(event_stream(N_EVENTS)).items():
            sink.write(view, rows, offline=False)
        models = tmp_path / "models"
        publish(models, world.ckpts[0], 1)
        req = {"user_id": 4, "item_ids": world.items[:10] + [UNKNOWN_ITEMS[0]]}
        with serving(world, models, repo=repo) as client:
            wait_for(lambda: healthy(client, "v1"), what="v1 to load")
            st, before = client.rank(req)
            assert st == 200 and sum(x["known"] for x in before["items"]) == 10, before  # the rows are in Redis
            t = int(time.time())  # the direct online_read on Redis gives get_online_features' frame
            pd.testing.assert_frame_equal(client.app.state.online.read(4, req["item_ids"], t).frame,
                                          online_frame(repo, 4, req["item_ids"], t))
            redis.kill()
            st, body = client.rank(req)
            assert st == 503 and "online feature read failed" in body["detail"], body
            assert "connect" in body["detail"].lower(), body  # the reason names the failure
            time.sleep(0.5)  # 5 polls: the poller re-opens the FeatureStore (registry only), still not healthy
            st, body = client.request("GET", "/healthz")
            assert st == 503 and "online feature read failed" in body["reason"], body
            assert client.metric("trm_serve_errors_total", kind="store_unavailable") == 1
            redis = restart_redis(redis)
            st, after = client.rank(req)  # the same server, no restart
            assert st == 200, after
            assert healthy(client, "v1")
            assert client.metric("trm_serve_errors_total", kind="internal") == 0
        want = {x["item_id"]: x["score"] for x in before["items"]}
        if after["event_time"] == before["event_time"]:  # the scores move with the request's second (item age)
            assert {x["item_id"]: x["score"] for x in after["items"]} == want
        assert [x["known"] for x in after["items"]].count(True) == 10
    finally:
        redis.stop()


# ------------------------------------------------------------------ --token-cache kafka
CACHED_ITEMS = 40  # world.items[:40] have records on item_tokens (and rows in Feast); the rest only Feast rows


def produce_item_tokens(config, rows: list[dict]) -> None:
    """ItemTokensEvent records on item_tokens as the item agent produces them (streams/item_agent.py):
    the Feast row's values, keyed by item, Avro-framed; acknowledged by the broker."""
    from streams.contract.codec import AvroCodec
    from streams.contract.events import ItemTokensEvent
    from streams.contract.topics import ITEM_TOKENS
    from streams.publisher import publish_raw

    codec = AvroCodec()
    pairs = []
    for r in rows:
        ev = ItemTokensEvent(r["item_id"], list(r["gen_tokens"]), list(r["mem_tokens"]), r["tokenizer_version"],
                             r["created_at"], r["event_timestamp"], r["retired"], list(r.get("coarse_tokens") or []),
                             list(r.get("lexical_tokens") or []))
        pairs.append((str(ev.item_id).encode(), codec.encode(ev.to_record(), "ItemTokensEvent")))
    assert publish_raw(config, ITEM_TOKENS, pairs) == len(rows)


def token_rows(items) -> list[dict]:
    """The item_tokens rows the world wrote to Feast, for `items`."""
    keep = set(items)
    return [r for r in feature_rows(event_stream(N_EVENTS))["item_tokens"] if r["item_id"] in keep]


def feast_path(client: Client, world: World, user: int, items: list[int], t: int) -> pd.DataFrame:
    """What the Feast-only path (OnlineFeatures: one service read) scores for this request at second t."""
    from trainer.evaluate import load_models, score

    models, cfg, info = load_models(client.app.state.registry.current.path)
    return score(models, online_frame(world.repo, user, items, t), featurizer(cfg))


def lookups(client: Client) -> tuple[float, float]:
    return (client.metric("trm_serve_token_cache_lookups_total", result="hit"),
            client.metric("trm_serve_token_cache_lookups_total", result="miss"))


@pytest.fixture(scope="module")
def token_broker(world):
    """A Tansu broker whose item_tokens topic holds records for world.items[:CACHED_ITEMS]."""
    from streams.broker import EmbeddedBroker
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig

    with EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap)
        create_topics(cfg)
        produce_item_tokens(cfg, token_rows(world.items[:CACHED_ITEMS]))
        yield cfg


@pytest.fixture(scope="module")
def cached(world, token_broker, tmp_path_factory):
    """A server on v1 with --token-cache kafka, its cache caught up with the topic."""
    from trainer.serving.token_cache import KafkaTokenCache

    models = tmp_path_factory.mktemp("cached") / "models"
    publish(models, world.ckpts[0], 1)
    cache = KafkaTokenCache(token_broker, retry_s=0.2)
    with serving(world, models, max_candidates=MAX_CANDIDATES, token_cache=cache) as client:
        wait_for(lambda: healthy(client, "v1"), what="v1 to load")
        assert cache.wait_caught_up(20), cache.status()
        yield client


def test_token_cache_ranking_equals_the_feast_path_bit_for_bit(world, cached):
    user, items = 3, world.items[:30]  # all in the cache
    cache = cached.app.state.token_cache
    assert len(cache) == CACHED_ITEMS and cache.get(items[0])["gen_tokens"] == token_rows(items[:1])[0]["gen_tokens"]
    hits, misses = lookups(cached)
    st, body = cached.rank({"user_id": user, "item_ids": items})
    assert st == 200, body
    assert lookups(cached) == (hits + 30, misses)  # every candidate's tokens came from the cache
    by_id = {x["item_id"]: x for x in body["items"]}
    want = feast_path(cached, world, user, items, body["event_time"])
    assert [by_id[i]["score"] for i in items] == [float(s) for s in want["score_trm"]]  # bit for bit
    assert [by_id[i]["known"] for i in items] == want["known"].tolist() == [True] * 30
    st, health = cached.request("GET", "/healthz")
    assert st == 200 and health["token_cache"]["caught_up"] and health["token_cache"]["items"] == CACHED_ITEMS


def test_an_item_missing_from_the_cache_is_read_from_feast_and_counted_as_a_miss(world, cached):
    user = 5
    hit, miss = world.items[CACHED_ITEMS - 5:CACHED_ITEMS], world.items[CACHED_ITEMS:CACHED_ITEMS + 5]
    items = miss[:2] + hit + list(UNKNOWN_ITEMS) + miss[2:]  # interleaved: request order is kept
    assert len(miss) == 5 and all(cached.app.state.token_cache.get(i) is None for i in miss)
    hits, misses = lookups(cached)
    st, body = cached.rank({"user_id": user, "item_ids": items})
    assert st == 200, body
    assert lookups(cached) == (hits + 5, misses + 7)  # 5 Feast-only items and 2 with no tokens anywhere
    by_id = {x["item_id"]: x for x in body["items"]}
    want = feast_path(cached, world, user, items, body["event_time"])
    assert [by_id[i]["score"] for i in items] == [float(s) for s in want["score_trm"]]  # bit for bit
    assert all(by_id[i]["known"] for i in miss + hit)  # the misses' tokens came from Feast
    assert not any(by_id[i]["known"] for i in UNKNOWN_ITEMS)
    _, text = cached.request("GET", "/metrics")
    assert f'trm_serve_token_cache_lookups_total{{result="miss"}} {misses + 7}' in text


def test_an_unreachable_broker_neither_makes_the_service_unready_nor_fails_a_request(world, tmp_path):
    """Broker down from the start: /healthz 200 (with the cache's error), /rank 200 and equal to the
    Feast path (every candidate a miss). Then a broker comes up on that address: the cache fills."""
    from streams.broker import EmbeddedBroker
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig
    from trainer.serving.token_cache import KafkaTokenCache

    port = free_port()  # nothing listens there
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}")
    models = tmp_path / "models"
    publish(models, world.ckpts[0], 1)
    cache = KafkaTokenCache(cfg, retry_s=0.2)
    user, items = 6, world.items[:10] + [UNKNOWN_ITEMS[1]]
    with serving(world, models, token_cache=cache) as client:
        health = wait_for(lambda: healthy(client, "v1"), what="v1 to load")
        wait_for(lambda: cache.error is not None, what="the cache to fail")
        health = healthy(client, "v1")
        assert health, "an unreachable broker must not make the service unready"
        tc = health["token_cache"]
        assert not tc["reading"] and not tc["caught_up"] and tc["items"] == 0, tc
        assert "KafkaConnectionError" in tc["last_error"] and str(port) in tc["last_error"], tc
        st, body = client.rank({"user_id": user, "item_ids": items})
        assert st == 200, body
        assert lookups(client) == (0, 11)
        want = feast_path(client, world, user, items, body["event_time"])
        by_id = {x["item_id"]: x for x in body["items"]}
        assert [by_id[i]["score"] for i in items] == [float(s) for s in want["score_trm"]]
        assert client.metric("trm_serve_errors_total", kind="internal") == 0

        with EmbeddedBroker(port=port):  # the broker comes (back): the cache recovers by itself
            create_topics(cfg)
            produce_item_tokens(cfg, token_rows(items))
            assert cache.wait_caught_up(20) and wait_for(lambda: len(cache) == 10, 10, "the records"), cache.status()
            wait_for(lambda: healthy(client)["token_cache"]["last_error"] is None, 5, "the error to clear")
            st, body = client.rank({"user_id": user, "item_ids": items})
            assert st == 200 and lookups(client) == (10, 12), body
            want = feast_path(client, world, user, items, body["event_time"])
            by_id = {x["item_id"]: x for x in body["items"]}
            assert [by_id[i]["score"] for i in items] == [float(s) for s in want["score_trm"]]
        # the broker goes away again: the cached items keep being served, requests still succeed
        st, body = client.rank({"user_id": user, "item_ids": items})
        assert st == 200 and lookups(client) == (20, 13), body
        assert healthy(client, "v1")
