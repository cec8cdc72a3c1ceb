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
