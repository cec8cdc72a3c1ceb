"""The trainer-side part-file index (trainer/pit_index.py) answers exactly what Feast answers.

A real Feast repo, written by the real sink in many part files, with the cases that decide a
point-in-time answer: rows replayed with a later `created` and other values, rows arriving late
(stamped long before the batch that reads them), planted future rows, events in the same second
as a row, a compaction between batches, and batches older than the index's boundary.
"""
import numpy as np
import pandas as pd
import pytest

from tests.trainer_fixtures import event_stream, feature_rows, make_repo
from trainer.pit_index import IndexConfig, IndexedJoiner
from trainer.pit_join import events_frame, historical_features

pytestmark = pytest.mark.integration


def _norm(v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(int(x) for x in v)
    if isinstance(v, (bool, np.bool_, str, pd.Timestamp)):
        return v
    return float(v)


def assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    assert a.dtypes.to_dict() == b.dtypes.to_dict()
    for c in a.columns:
        left = [_norm(v) for v in a[c].tolist()]
        right = [_norm(v) for v in b[c].tolist()]
        bad = [i for i, (x, y) in enumerate(zip(left, right)) if x != y]
        assert not bad, f"{c}: {len(bad)} rows differ, first {bad[0]}: index {left[bad[0]]} vs feast {right[bad[0]]}"


def _write(sink, rows, chunks):
    for view, rs in rows.items():
        for part in np.array_split(np.arange(len(rs)), chunks):
            if len(part):
                sink.write(view, [rs[i] for i in part], online=False)


def test_index_answers_equal_feast_across_late_rows_replays_and_compaction(tmp_path):
    from feast import FeatureStore

    from streams.compaction import compact_repo
    from streams.feast_sink import FeastSink

    stream = event_stream(900, n_users=25, n_items=50, seed=3)
    head, tail = stream[:500], stream[500:]
    repo = make_repo(tmp_path, [])
    sink = FeastSink(repo)
    rows = feature_rows(stream)
    by_time = {v: [r for r in rs if r["event_timestamp"] < tail[0].event_time] for v, rs in rows.items()}
    _write(sink, by_time, 12)
    store = FeatureStore(repo_path=str(repo))
    joiner = IndexedJoiner(str(repo), cfg=IndexConfig(horizon_s=600, fold_rows=40))

    def same(events):
        ev = events_frame(events)
        got = joiner(ev)
        assert_same(got, historical_features(store, ev))
        return got

    same(head[300:340])
    rng = np.random.default_rng(0)
    later = {v: [r for r in rs if r["event_timestamp"] >= tail[0].event_time] for v, rs in rows.items()}
    step = 50
    for b, s in enumerate(range(0, len(tail), step)):
        batch_end = tail[min(s + step, len(tail)) - 1].event_time
        new = {v: [r for r in rs if r["event_timestamp"] <= batch_end and r.get("_done") is None]
               for v, rs in later.items()}
        for rs in new.values():
            for r in rs:
                r["_done"] = True
        clean = {v: [{k: x for k, x in r.items() if k != "_done"} for r in rs] for v, rs in new.items()}
        _write(sink, clean, 3)
        # replays: a later `created`, other values, same (key, event_timestamp): the replay wins
        hist = [r for r in rows["user_history"] if r["event_timestamp"] <= batch_end]
        for r in rng.choice(len(hist), 3, replace=False):
            rep = {k: v for k, v in hist[r].items() if k != "_done"}
            rep["user_n_events"] = 10_000 + b
            sink.write("user_history", [rep], online=False)
        # a late row: stamped well before the boundary, written only now
        late = dict(item_id=int(rng.integers(1, 51)), item_n_interactions=500 + b, item_n_positives=1,
                    event_timestamp=int(tail[0].event_time - 5000 - b))
        sink.write("item_stats", [late], online=False)
        if b == 4:
            res = compact_repo(repo, older_than_s=0, delete_grace_s=0, min_files=2)
            assert sum(r.merged for r in res) > 0
        same(tail[s:s + step])
        # events in the same second as rows just written: the PIT rule excludes them
        same([type(e)(e.user_id, e.item_id, e.label, e.event_time) for e in tail[s:s + 5]])
    assert joiner.stats["indexed"] > 0
    # a batch from long before the boundary is answered by Feast, still identical
    got = same(head[:40])
    assert joiner.stats["feast"] >= 40 and len(got) == 40
    # memory: the snapshot holds one row per entity, the delta at most the horizon plus a fold
    held = joiner.rows_held
    assert held["user_history"] <= 25 + 60 + 40 + 50 * 4


def test_index_on_a_store_with_nothing_yet_answers_nothing_like_feast(tmp_path):
    """The first batches of a fresh deployment: no feature rows at all (only the seed files)."""
    from feast import FeatureStore

    repo = make_repo(tmp_path, [])
    ev = events_frame(event_stream(40, seed=1))
    got = IndexedJoiner(str(repo))(ev)
    assert_same(got, historical_features(FeatureStore(repo_path=str(repo)), ev))
    assert got["gen_tokens"].isna().all()


def test_snapshot_keeps_the_latest_row_per_key_columnar_and_bounded():
    """The snapshot's columnar fold (trainer/pit_index.py `_Snapshot`) against a per-row reference:
    the latest (event_timestamp, created) per key wins, a full tie goes to the row added last;
    many small folds (chunks merging, superseded rows dropped) keep its store within 2 x entities."""
    import pyarrow as pa

    from trainer.pit_index import CREATED, TS, _Snapshot

    schema = pa.schema([("v", pa.int64()), ("toks", pa.list_(pa.int64()))])
    snap = _Snapshot(schema, fold_batch=37)
    rng = np.random.default_rng(5)
    want: dict[int, tuple[int, int, int]] = {}
    serial = 0
    for step in range(60):
        n = int(rng.integers(1, 80))
        k = rng.integers(0, 150, n)
        ts = rng.integers(0, 6, n)  # few distinct stamps: many ties, then full ties
        cr = rng.integers(0, 3, n)
        v = np.arange(serial, serial + n)
        serial += n
        snap.add(pa.table({"id": k, TS: ts, CREATED: cr, "v": v, "toks": [[int(x), int(x) % 7] for x in v]}))
        for key, a, b, val in zip(k.tolist(), ts.tolist(), cr.tolist(), v.tolist()):
            if key not in want or (a, b) >= want[key][:2]:
                want[key] = (a, b, val)
        if step % 7 == 6:  # a lookup folds what is buffered
            keys = np.arange(-5, 160)
            hit, got = snap.lookup(keys)
            assert keys[hit].tolist() == sorted(want)
            assert got.column("v").to_pylist() == [want[x][2] for x in sorted(want)]
            assert got.column("toks").to_pylist() == [[want[x][2], want[x][2] % 7] for x in sorted(want)]
            assert snap.rows_held <= 2 * len(want) + 80
            assert len(snap.chunks) <= 2 * int(np.log2(max(snap.stored, 2))) + 2
