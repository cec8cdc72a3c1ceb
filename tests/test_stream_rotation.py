"""Tokenizer rotation in the stream (issue 15, parts 2 and 4), on a real Feast repo, without Kafka.

The item and interaction processors run as the worker's loops do (their outputs fed back as the
`item_tokens` topic would), across a rotation recorded at T and `trm tokenizer backfill`:
* point-in-time answers for times before T are the same before and after the backfill; from T on
  items and user histories hold the new artifact's tokens and version;
* an interaction at or after T that arrives between the switch and the backfill is parked (it
  survives a restart), applied once after the backfill, counted once, and a replay of it is a
  duplicate;
* a second backfill writes nothing;
* a worker handed an artifact whose encoder differs from the installed one refuses to start.
`test_rotation_through_the_running_worker_and_the_broker` (integration) runs the same rotation end to
end: the real `trm worker` process on the Tansu broker, `trm tokenizer rotate` and `backfill --bootstrap`.
"""
from __future__ import annotations

import json
from collections import defaultdict

import pytest

from streams.contract.codec import AvroCodec
from streams.contract.events import InteractionEvent, ItemEvent, ItemTokensEvent
from streams.dlq import SourceRecord
from tests.streams_fixtures import feast_repo, ml_slice, tiny_tokenizer  # noqa: F401
from tests.tokenizer_fixtures import rewrite_artifact_file

CODEC = AvroCodec()
T0 = 1_600_000_000  # items are published at T0
T = T0 + 10_000  # the rotation time
N_ITEMS = 20
USERS = (1, 2, 3, 4)
USER_FEATS = ["user_history:hist_item_ids", "user_history:hist_gen_tokens", "user_history:user_n_events",
              "user_history:recent_item_ids", "user_history:recent_gen_tokens", "user_history:tokenizer_version"]
ITEM_FEATS = ["item_tokens:gen_tokens", "item_tokens:mem_tokens", "item_tokens:tokenizer_version",
              "item_tokens:created_at", "item_tokens:lexical_tokens"]
BEFORE = [T0 + 1, T0 + 2_500, T0 + 6_001, T - 1]  # point-in-time probes before T


@pytest.fixture(scope="module")
def new_artifact(tmp_path_factory, ml_slice):  # noqa: F811
    """B: another fit of the same geometry (another seed), so most ids differ from A's."""
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    items, its = ml_slice
    cfg = TokenizerConfig(levels=3, codebook_size=8, mem_vocab_size=64, kmeans_niter=10, align=False,
                          threads=2, seed=1)
    return HybridTokenizer.fit(list(items.values()), its, cfg, progress=False).save(
        tmp_path_factory.mktemp("tok-b") / "artifact")


def item_rec(off: int, ev: ItemEvent) -> SourceRecord:
    return SourceRecord("items", 0, off, str(ev.item_id).encode(), CODEC.encode(ev.to_record(), "ItemEvent"))


def inter_rec(off: int, user: int, item: int, label: int, t: int) -> SourceRecord:
    return SourceRecord("interactions", 0, off, str(user).encode(),
                        CODEC.encode(InteractionEvent(f"r{off}", user, item, label, t).to_record(), "InteractionEvent"))


class Tokens:
    """The `item_tokens` topic as the workers' TokenCache reads it: latest, and per version."""

    def __init__(self):
        self.latest: dict[int, list[int]] = {}
        self.by_version: dict[str, dict[int, list[int]]] = defaultdict(dict)

    def learn(self, ev: ItemTokensEvent) -> None:
        self.latest[ev.item_id] = self.by_version[ev.tokenizer_version][ev.item_id] = list(ev.gen_tokens)

    def outputs(self, outputs) -> None:
        for _, v in outputs:
            self.learn(ItemTokensEvent.from_record(CODEC.decode(v, expect="ItemTokensEvent")))

    def rows(self, rows) -> None:  # what `trm tokenizer backfill` publishes
        for r in rows:
            self.learn(ItemTokensEvent(r["item_id"], r["gen_tokens"], r["mem_tokens"], r["tokenizer_version"],
                                       r["created_at"], r["event_timestamp"], r["retired"], r["coarse_tokens"],
                                       r["lexical_tokens"]))


def interactions(items: list[int]) -> list[tuple[int, int, int, int]]:
    """(user, item, label, t) before T: each user likes some items and skips others."""
    out, t = [], T0 + 100
    for k in range(24):
        out.append((USERS[k % 4], items[(3 * k) % len(items)], int(k % 3 != 2), t))
        t += 250
    return out


def pit(store, feats: list[str], key: str, ids, times) -> list[dict]:
    import pandas as pd

    from streams.feast_sink import to_utc

    edf = pd.DataFrame([{key: i, "event_timestamp": to_utc(t)} for i in ids for t in times])
    df = store.get_historical_features(entity_df=edf, features=feats).to_df()
    df["event_timestamp"] = [int(x.timestamp()) for x in df["event_timestamp"]]
    rows = []
    for r in df.sort_values([key, "event_timestamp"]).to_dict("records"):
        rows.append({k: (list(map(int, v)) if hasattr(v, "__len__") and not isinstance(v, str)
                         else (None if v is None or v != v else v)) for k, v in r.items()})
    return rows


def test_rotation_backfill_keeps_the_past_and_loses_no_interaction(  # noqa: F811
        feast_repo, tiny_tokenizer, new_artifact, ml_slice, tmp_path, monkeypatch):
    from streams.backfill import BackfillConfig, backfill, texts_at
    from streams.feast_sink import FeastSink
    from streams.interaction_agent import InteractionProcessor
    from streams.item_agent import ItemProcessor
    from streams.rotation import Rotation, RotationWatch, read_rotation, write_rotation
    from tokenizer.lexical import lexical_tokens
    from tokenizer.hybrid import HybridTokenizer
    from trm.cli import main

    items, _ = ml_slice
    catalogue = [ItemEvent.from_item(it, event_time=T0) for it in list(items.values())[:N_ITEMS]]
    ids = [ev.item_id for ev in catalogue]
    tok_a, tok_b = HybridTokenizer.load(tiny_tokenizer), HybridTokenizer.load(new_artifact)
    sink = FeastSink(feast_repo)
    tokens = Tokens()
    item_proc = ItemProcessor(sink, tok_a, rotation=RotationWatch(feast_repo), load=HybridTokenizer.load)

    def interaction_processor():
        p = InteractionProcessor(sink, tmp_path / "state", None, tokens.latest.get, "interactions", history_len=4,
                                 recent_len=4, rotation=RotationWatch(feast_repo),
                                 tokens_in=lambda i, v: tokens.by_version[v].get(i))
        p.assign([0])
        return p

    # before the rotation: A tokenizes the catalogue, interactions build histories
    tokens.outputs(item_proc.process([item_rec(k, ev) for k, ev in enumerate(catalogue)]).outputs)
    inter = interaction_processor()
    evs = interactions(ids)
    r = inter.process([inter_rec(k, *e) for k, e in enumerate(evs)])
    assert (r.applied, r.parked) == (len(evs), 0)
    inter.save(r.hwm)

    # the switch: rotation recorded at T (the processors re-read the record, no restart)
    write_rotation(feast_repo, Rotation(tok_a.version, str(tiny_tokenizer), tok_b.version, str(new_artifact), T))
    late = ItemEvent.from_item(items[ids[0]], event_time=T0 + 50)  # an update before T, processed after the switch
    fresh = ItemEvent(900_001, "new film", "a brand new film about rotations", [], T + 100, T + 100)
    out = item_proc.process([item_rec(N_ITEMS, late), item_rec(N_ITEMS + 1, fresh)]).outputs
    made = [ItemTokensEvent.from_record(CODEC.decode(v, expect="ItemTokensEvent")) for _, v in out]
    assert [e.tokenizer_version for e in made] == [tok_a.version, tok_b.version]  # by event time
    tokens.outputs(out)

    # mid-rotation: an interaction after T waits for the backfill; one before T is applied with A's tokens
    n_before = {u: sum(1 for e in evs if e[0] == u) for u in USERS}
    mid = inter_rec(len(evs), 1, ids[5], 1, T + 300)
    r = inter.process([mid, inter_rec(len(evs) + 1, 2, ids[7], 1, T - 50)])
    assert (r.applied, r.parked, len(r.outputs)) == (1, 1, 2)  # both forwarded to the item counters, once
    inter.save(r.hwm)
    inter.revoke([0])
    inter = interaction_processor()  # a restart mid-rotation: the parked interaction comes back
    assert inter.n_parked() == 1 and inter.retry_parked().applied == 0  # still waiting for the backfill

    store = sink.store
    past_users = pit(store, USER_FEATS, "user_id", USERS, BEFORE)
    past_items = pit(store, ITEM_FEATS, "item_id", ids, BEFORE)
    assert {r["tokenizer_version"] for r in past_users} == {None, tok_a.version}  # A's: the row at T - 50

    # the backfill: every item re-tokenized at T, every history re-stamped at T
    texts = texts_at(catalogue + [late, fresh], T)
    rep = backfill(BackfillConfig(feast_repo, T, batch=8, progress=False), tok_b, texts, tokens.rows)
    assert (rep.items_written, rep.items_current, rep.items_without_text) == (N_ITEMS, 0, [])
    assert rep.users_written == len(USERS)
    assert read_rotation(feast_repo).backfilled

    r = inter.retry_parked()  # the parked interaction is applied now, once
    assert (r.applied, r.parked, r.outputs, r.dead) == (1, 0, [], [])
    inter.save(r.hwm)

    # before T: nothing changed
    assert pit(store, USER_FEATS, "user_id", USERS, BEFORE) == past_users
    assert pit(store, ITEM_FEATS, "item_id", ids, BEFORE) == past_items
    # from T: B's tokens and version everywhere
    b_gen = {i: list(t.gen_tokens) for i, t in zip(ids, tok_b.encode_texts([texts[i] for i in ids]))}
    assert any(b_gen[i] != tokens.by_version[tok_a.version][i] for i in ids)  # the test means something
    cats = {ev.item_id: lexical_tokens(ev.categories, ev.title) for ev in catalogue}
    assert all(cats.values())  # the test means something: every film of the slice has genres
    for row in pit(store, ITEM_FEATS, "item_id", ids, [T, T + 1_000]):
        assert (row["gen_tokens"], row["tokenizer_version"]) == (b_gen[row["item_id"]], tok_b.version)
        assert row["lexical_tokens"] == cats[row["item_id"]]  # the item event's, kept across the rotation
    assert all(r["lexical_tokens"] == cats[r["item_id"]] for r in past_items if r["gen_tokens"] is not None)
    at_t = pit(store, USER_FEATS, "user_id", USERS, [T, T + 1_000])
    for row in at_t:
        assert row["tokenizer_version"] == tok_b.version
        assert row["hist_gen_tokens"] == [x for i in row["hist_item_ids"] for x in b_gen[i]]
        assert row["recent_gen_tokens"] == [x for i in row["recent_item_ids"] for x in b_gen[i]]
        late_one = 1 if row["user_id"] == 2 else 0  # its interaction at T - 50
        mid_one = 1 if row["user_id"] == 1 and row["event_timestamp"] > T + 300 else 0
        assert row["user_n_events"] == n_before[row["user_id"]] + late_one + mid_one  # none lost, none twice
    u1 = [row for row in at_t if row["user_id"] == 1 and row["event_timestamp"] > T + 300][0]
    assert u1["hist_item_ids"][-1] == ids[5]

    # a replay of the mid-rotation interaction is a duplicate; a second backfill (the CLI) writes nothing
    inter.revoke([0])
    inter = interaction_processor()
    r = inter.process([SourceRecord(mid.topic, 0, mid.offset + 100, mid.key, mid.value)])
    assert (r.duplicates, r.applied, r.outputs) == (1, 0, [])
    inter.save(r.hwm)
    before_items = pit(store, ITEM_FEATS, "item_id", ids, BEFORE + [T, T + 1_000])
    before_users = pit(store, USER_FEATS, "user_id", USERS, BEFORE + [T, T + 1_000])
    cat_file = tmp_path / "catalogue.jsonl"
    cat_file.write_text("".join(json.dumps(ev.to_record()) + "\n" for ev in catalogue + [late, fresh]))
    monkeypatch.delenv("TRM_KAFKA_BOOTSTRAP", raising=False)
    parts = len(list((feast_repo / "data" / "offline").glob("*/*.parquet")))
    assert main(["tokenizer", "backfill", "--repo", str(feast_repo), "--items", str(cat_file), "--quiet"]) == 0
    assert len(list((feast_repo / "data" / "offline").glob("*/*.parquet"))) == parts  # no row written
    assert pit(store, ITEM_FEATS, "item_id", ids, BEFORE + [T, T + 1_000]) == before_items
    assert pit(store, USER_FEATS, "user_id", USERS, BEFORE + [T, T + 1_000]) == before_users


def test_worker_refuses_an_artifact_of_another_encoder(feast_repo, tiny_tokenizer, tmp_path):  # noqa: F811
    import shutil

    from streams.app import WorkerConfigError, WorkerSettings
    from streams.rotation import Rotation, write_rotation
    from tokenizer.artifact import verify

    other = shutil.copytree(tiny_tokenizer, tmp_path / "other")
    meta = json.loads((other / "encoder.json").read_text())
    meta["weights_sha256"] = "0" * 64
    rewrite_artifact_file(other, "encoder.json", json.dumps(meta).encode())
    with pytest.raises(WorkerConfigError, match="installed encoder weights"):
        WorkerSettings(repo_path=feast_repo, tokenizer_dir=other).resolved()
    WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer).resolved()  # the good one starts
    # ... and so does a rotation to it
    write_rotation(feast_repo, Rotation(verify(tiny_tokenizer), str(tiny_tokenizer), "tok-x", str(other), T))
    with pytest.raises(WorkerConfigError, match=f"{other}.*installed encoder weights"):
        WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer).resolved()


def test_cli_help_and_rotate(feast_repo, tiny_tokenizer, new_artifact, capsys):  # noqa: F811
    from streams.rotation import read_rotation
    from trm.cli import main

    for action in ("rotate", "backfill"):
        with pytest.raises(SystemExit) as exc:
            main(["tokenizer", action, "--help"])
        assert exc.value.code == 0
    assert "backfill" in capsys.readouterr().out
    assert main(["tokenizer", "rotate", "--repo", str(feast_repo), "--artifact", str(new_artifact),
                 "--at", "2020-09-13T12:26:40"]) == 2  # no rotation yet: --from is needed
    assert main(["tokenizer", "rotate", "--repo", str(feast_repo), "--artifact", str(new_artifact),
                 "--from", str(tiny_tokenizer), "--at", "2020-09-13T12:26:40"]) == 0
    rot = read_rotation(feast_repo)
    assert rot.at == 1_600_000_000 and not rot.backfilled and rot.to_artifact == str(new_artifact.resolve())
    # the same rotation again (a retried job): the record, and its T, stay as they are
    assert main(["tokenizer", "rotate", "--repo", str(feast_repo), "--artifact", str(new_artifact), "--at", "now"]) == 0
    assert read_rotation(feast_repo) == rot


def test_the_record_lives_where_trm_rotation_file_says(feast_repo, tiny_tokenizer, new_artifact, tmp_path,  # noqa: F811
                                                       monkeypatch):
    """Each pod of a deployment has its own copy of the repo: $TRM_ROTATION_FILE names one record
    on a volume they all mount (deploy/k8s, docker-compose), read by rotate, workers and backfill alike."""
    from streams.rotation import RotationWatch, read_rotation, rotation_path
    from trm.cli import main

    shared = tmp_path / "artifacts" / "rotation.json"
    shared.parent.mkdir()
    monkeypatch.setenv("TRM_ROTATION_FILE", str(shared))
    assert rotation_path(feast_repo) == shared
    assert main(["tokenizer", "rotate", "--repo", str(feast_repo), "--artifact", str(new_artifact),
                 "--from", str(tiny_tokenizer), "--at", "2020-09-13T12:26:40"]) == 0
    assert shared.is_file() and not (feast_repo / "rotation.json").exists()
    assert read_rotation(feast_repo).at == 1_600_000_000
    assert RotationWatch(feast_repo).current().at == 1_600_000_000


# -- end to end: the real `trm worker` process and the real broker across `rotate` and `backfill` --

FRESH = 900_001  # an item created after T


def _status(repo) -> dict:
    try:
        return json.loads((repo / "stream_state" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _wait(what: str, cond, worker, log_path, timeout: float = 90.0) -> None:
    """Poll `cond()` until true; fail at the deadline or when the worker exits, with its log."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert worker.poll() is None, f"the worker exited while waiting for {what}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {_status_text(worker)}"
        time.sleep(0.1)


def _status_text(worker) -> str:
    return getattr(worker, "_status", lambda: "")()


def _counts(repo) -> tuple[int, int, int, int]:
    st = _status(repo)
    return (st.get("items", {}).get("processed", 0), st.get("interactions", {}).get("processed", 0),
            st.get("interactions", {}).get("parked", 0), st.get("item_stats", {}).get("processed", 0))


def _state_at(timeline: list, t: int):
    """The reference state after every event <= t (stream_checks.reference's timeline)."""
    last = None
    for ts, snap in timeline:
        if ts > t:
            break
        last = snap
    return last


@pytest.mark.integration
def test_rotation_through_the_running_worker_and_the_broker(  # noqa: F811
        broker, feast_repo, tiny_tokenizer, new_artifact, ml_slice, tmp_path):
    """Issue 15 end to end: `trm worker` (a subprocess) runs on the Tansu broker with A while
    `trm tokenizer rotate` records B at T (no restart), item events and interactions on both
    sides of T arrive, and `trm tokenizer backfill --bootstrap` teaches the worker's token cache
    B's tokens through `item_tokens`. Checked through Feast: answers before T unchanged and A's,
    from T B's, a late item event (before T) A's, each interaction after T parked until the
    backfill and then in its user's rows exactly once, the item counters counting it once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from streams.backfill import read_rows
    from streams.contract.topics import create_topics
    from streams.feast_sink import FeastSink
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_kind
    from streams.rotation import read_rotation
    from tests.stream_checks import HISTORY_LEN, reference
    from tests.streams_fixtures import ROOT
    from tokenizer.hybrid import HybridTokenizer
    from trm.cli import main

    started = time.monotonic()
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
    create_topics(cfg)
    items, _ = ml_slice
    tok_a, tok_b = HybridTokenizer.load(tiny_tokenizer), HybridTokenizer.load(new_artifact)

    def gen(tok, text: str) -> list[int]:
        return list(tok.encode_texts([text])[0].gen_tokens)

    catalogue = [ItemEvent.from_item(it, event_time=T0) for it in list(items.values())[:N_ITEMS]]
    ids = [ev.item_id for ev in catalogue]
    text0 = {ev.item_id: ev.text for ev in catalogue}
    # the late event (before T, processed after the switch) and the upsert after T change the text;
    # pick items where the artifacts' tokens tell the cases apart, so the assertions mean something
    late_text = {i: text0[i] + " A restored director's cut with a darker ending." for i in ids}
    up_text = {i: "A remake set in space: astronauts, aliens and a starship far from home. " + text0[i] for i in ids}
    lt = next(i for i in ids if gen(tok_a, late_text[i]) != gen(tok_b, late_text[i]))
    up = next(i for i in ids if i != lt and gen(tok_b, up_text[i]) != gen(tok_b, text0[i]))
    src = items[lt]
    late = ItemEvent(lt, src.title, late_text[lt], list(src.genres), src.created_at, T0 + 50)
    src = items[up]
    upsert = ItemEvent(up, src.title, up_text[up], list(src.genres), src.created_at, T + 200)
    fresh = ItemEvent(FRESH, "new film", "a brand new film about rotations", ["Drama"], T + 100, T + 100)

    def ev(k: int, user: int, item: int, label: int, t: int) -> InteractionEvent:
        return InteractionEvent(f"e{k}", user, item, label, t)

    before = [ev(k, *e) for k, e in enumerate(interactions(ids))]
    mid_before = [ev(100, 4, ids[7], 1, T - 50)]  # before T, arriving mid-rotation: applied at once with A
    after = [ev(200 + k, *e) for k, e in enumerate([(1, ids[5], 1, T + 300), (2, FRESH, 1, T + 400),
                                                    (3, up, 1, T + 500), (4, ids[11], 1, T + 600),
                                                    (1, ids[9], 0, T + 700), (2, up, 1, T + 800)])]
    everything = sorted(before + mid_before + after, key=lambda e: e.event_time)

    env = dict(os.environ, TRM_KAFKA_BOOTSTRAP=broker.bootstrap, TRM_KAFKA_SESSION_TIMEOUT_MS="6000")
    env.pop("TRM_ROTATION_FILE", None)
    log_path = tmp_path / "worker.log"
    log = open(log_path, "a")
    worker = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "trm.cli", "worker", "--repo", str(feast_repo),
                               "--tokenizer", str(tiny_tokenizer), "--history-len", str(HISTORY_LEN)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    worker._status = lambda: f"{_status(feast_repo)}\n{log_path.read_text()[-3000:]}"  # type: ignore[attr-defined]
    timings = {}
    try:
        # 1. before the rotation: A tokenizes the catalogue, interactions build the histories
        publish_kind(cfg, "items", catalogue, progress=False)
        publish_kind(cfg, "interactions", before, progress=False)
        n0 = len(before)
        _wait("the events before the rotation", lambda: _counts(feast_repo) == (N_ITEMS, n0, 0, n0), worker, log_path,
              timeout=120)
        timings["before"] = time.monotonic() - started
        store = FeastSink(feast_repo).store
        probes0 = [T0 + 1, T0 + 2_500, T0 + 6_001, T - 100]
        past_users = pit(store, USER_FEATS, "user_id", USERS, probes0)
        past_items = pit(store, ITEM_FEATS, "item_id", ids, probes0)
        assert {r["tokenizer_version"] for r in past_users if r["user_n_events"]} == {tok_a.version}
        assert all(r["gen_tokens"] == gen(tok_a, text0[r["item_id"]]) and r["tokenizer_version"] == tok_a.version
                   for r in past_items)

        # 2. the switch, with the real CLI while the worker runs
        assert main(["tokenizer", "rotate", "--repo", str(feast_repo), "--artifact", str(new_artifact),
                     "--from", str(tiny_tokenizer), "--at", str(T)]) == 0
        assert read_rotation(feast_repo).at == T

        # 3. mid-rotation: items after T (a new one, an upsert), a late one before T; interactions
        publish_kind(cfg, "items", [fresh, upsert, late], progress=False)
        _wait("the item events after the switch", lambda: _counts(feast_repo)[0] == N_ITEMS + 3, worker, log_path)
        publish_kind(cfg, "interactions", mid_before + after, progress=False)
        n1 = n0 + len(mid_before)
        n_all = n1 + len(after)
        _wait("the mid-rotation interactions", lambda: _counts(feast_repo) == (N_ITEMS + 3, n1, len(after), n_all),
              worker, log_path)
        timings["mid"] = time.monotonic() - started
        # parked: no user row at or after T yet; the item counters count them already
        user_rows = read_rows(feast_repo, "user_history")
        assert [r for r in user_rows if r["event_timestamp"] >= T] == []
        assert any(r["event_timestamp"] == T - 50 and r["user_id"] == 4 for r in user_rows)
        stat_feats = ["item_stats:item_n_interactions", "item_stats:item_n_positives"]
        counted = sorted({e.item_id for e in everything})
        stat_probes = [T - 1, T + 450, T + 1_000]

        def counters() -> list[dict]:
            return pit(store, stat_feats, "item_id", counted, stat_probes)

        def expected_counters() -> list[dict]:
            return [{"item_id": i, "event_timestamp": t,
                     "item_n_interactions": sum(1 for e in everything if e.item_id == i and e.event_time <= t) or None,
                     "item_n_positives": sum(e.label for e in everything if e.item_id == i and e.event_time <= t)
                     if any(e.item_id == i and e.event_time <= t for e in everything) else None}
                    for i in counted for t in stat_probes]
        assert counters() == expected_counters()

        # 4. the backfill, with the real CLI: items and histories at T, B's tokens to the workers' caches
        cat_file = tmp_path / "catalogue.jsonl"
        cat_file.write_text("".join(json.dumps(e.to_record()) + "\n" for e in catalogue + [late, fresh, upsert]))
        assert main(["tokenizer", "backfill", "--repo", str(feast_repo), "--items", str(cat_file),
                     "--bootstrap", broker.bootstrap, "--quiet"]) == 0
        rot = read_rotation(feast_repo)
        assert rot.backfilled and rot.backfill["items_written"] == N_ITEMS and rot.backfill["users_written"] == 4
        _wait("the parked interactions", lambda: _counts(feast_repo) == (N_ITEMS + 3, n_all, 0, n_all),
              worker, log_path)
        timings["applied"] = time.monotonic() - started
        assert _status(feast_repo)["interactions"]["dead_lettered"] == 0
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        log.close()
    assert worker.returncode == 0, log_path.read_text()[-3000:]

    # 5. the stores, through Feast
    store = FeastSink(feast_repo).store
    # before T: the answers of before the rotation (the late event changed only its own item, with A)
    assert pit(store, USER_FEATS, "user_id", USERS, probes0) == past_users
    assert [r for r in pit(store, ITEM_FEATS, "item_id", ids, probes0) if r["item_id"] != lt] == \
        [r for r in past_items if r["item_id"] != lt]
    for r in pit(store, ITEM_FEATS, "item_id", [lt], [T0 + 1, T0 + 50, T - 1]):
        want = text0[lt] if r["event_timestamp"] < T0 + 50 else late_text[lt]
        assert (r["gen_tokens"], r["tokenizer_version"]) == (gen(tok_a, want), tok_a.version), r  # late: A's
    # from T: B's, from each item's text as of the row's time
    b_at_t = {i: gen(tok_b, late_text[i] if i == lt else text0[i]) for i in ids}
    assert any(b_at_t[i] != gen(tok_a, text0[i]) for i in ids)  # the test means something
    for r in pit(store, ITEM_FEATS, "item_id", ids + [FRESH], [T, T + 150, T + 250, T + 1_000]):
        i, t = r["item_id"], r["event_timestamp"]
        if i == FRESH:
            want = gen(tok_b, fresh.text) if t >= fresh.event_time else None
        else:
            want = gen(tok_b, up_text[i]) if i == up and t >= upsert.event_time else b_at_t[i]
        assert r["gen_tokens"] == want, r
        assert r["tokenizer_version"] == (tok_b.version if want is not None else None), r
    # the item counters: every interaction counted once (none lost, none doubled by the parking)
    assert counters() == expected_counters()
    # user rows: every event exactly once; from T on version B and B's tokens for every event
    b_now = {**b_at_t, up: gen(tok_b, up_text[up]), FRESH: gen(tok_b, fresh.text)}  # what the worker's cache has
    users_tl, _ = reference(everything, b_now)
    u_probes = [T - 1, T, T + 300, T + 450, T + 650, T + 1_000]
    for r in pit(store, USER_FEATS, "user_id", USERS, u_probes):
        u, t = r["user_id"], r["event_timestamp"]
        ref = _state_at(users_tl[u], t)
        assert (r["hist_item_ids"], r["recent_item_ids"], r["user_n_events"]) == \
            (ref["hist_item_ids"], ref["recent_item_ids"], ref["user_n_events"]), (r, ref)
        if t < T:
            assert r["tokenizer_version"] == tok_a.version, r
            continue
        assert r["tokenizer_version"] == tok_b.version, r
        # the row at T is the backfill's (each item's B tokens at T); later ones the worker's (its cache's)
        by_worker = max(e.event_time for e in everything if e.user_id == u and e.event_time <= t) >= T
        toks = b_now if by_worker else b_at_t
        got = dict(zip(r["recent_item_ids"], (r["recent_gen_tokens"][k:k + 3] for k in range(0, 60, 3))))
        got.update(zip(r["hist_item_ids"], (r["hist_gen_tokens"][k:k + 3] for k in range(0, 60, 3))))
        # every item of a row stamped B shows B's tokens, also in rows the worker wrote after the
        # backfill: it applies parked events only once its token cache has read every item_tokens
        # record the backfill sent (the record's tokens_through), never A's tokens as a fallback
        assert {i for i, g in got.items() if g != toks[i]} == set(), (r, got)
        assert r["hist_gen_tokens"] == [x for i in r["hist_item_ids"] for x in toks[i]], r
        assert r["recent_gen_tokens"] == [x for i in r["recent_item_ids"] for x in toks[i]], r
    online = FeastSink(feast_repo).read_online("user_history", list(USERS))
    assert {online[u]["tokenizer_version"] for u in USERS} == {tok_b.version}
    assert {u: online[u]["user_n_events"] for u in USERS} == {u: sum(e.user_id == u for e in everything) for u in USERS}
    print(f"\nrotation end to end: {timings} (s since start), total {time.monotonic() - started:.1f} s")
    rec = read_rotation(feast_repo)
    assert rec.backfilled and rec.tokens_through and sum(rec.tokens_through.values()) > 0, rec


def test_parked_events_wait_until_the_cache_has_read_the_backfills_tokens(tmp_path):
    """The backfill marks the record before a worker's token cache has fetched what it sent: a
    parked event at or after T is applied only once the cache's position reaches the record's
    `tokens_through` on every partition (else its row, stamped B, would keep A's tokens)."""
    from streams.interaction_agent import InteractionProcessor
    from streams.rotation import Rotation

    rot = Rotation("tok-a", "/a", "tok-b", "/b", T, backfilled_at=1.0, tokens_through={"0": 7, "2": 3})
    pos = {0: 6, 2: 3}
    p = InteractionProcessor(None, tmp_path / "state", None, lambda i: [1, 2, 3], "interactions",
                             tokens_in=lambda i, v: [1, 2, 3], tokens_position=lambda part: pos.get(part, 0))
    assert p._waits(rot, T) and p._waits(rot, T + 5) and not p._waits(rot, T - 1)  # before T: never waits
    pos[0] = 7
    assert not p._waits(rot, T)
    assert p._waits(Rotation("tok-a", "/a", "tok-b", "/b", T), T)  # not backfilled yet: waits anyway
    # a record written by a backfill without a broker (no tokens sent): marked is enough
    assert not p._waits(Rotation("tok-a", "/a", "tok-b", "/b", T, backfilled_at=1.0), T)
