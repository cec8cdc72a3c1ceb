"""Worker state written before the structure refactor still loads and behaves the same.

tests/data/legacy_stream_state/ holds the per-partition SQLite state that the interaction and
item-stats processors of commit 495df4e left after batch "a" of events.json (compaction, a late
event, a duplicate, a parked interaction), and what that code wrote for batch "b" on top of it
(make_fixture.py there says how it was made). Today's processors open a copy of that state, run
batch "b", and must write the same feature rows, report the same counts and commit positions.

The user_history rows have grown since (recent_*, last_event_time): the old features must be the
same, and the new ones start from what the old file knows: an empty recent list in the compacted
base, then the detail rows, whose negatives' gen-tokens the old code did not save (tok = 0: L x -1).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from streams.contract.codec import AvroCodec
from streams.contract.events import InteractionEvent
from streams.dlq import SourceRecord
from streams.interaction_agent import InteractionProcessor
from streams.item_stats_agent import ItemStatsProcessor

FIXTURE = Path(__file__).parent / "data" / "legacy_stream_state"
NEW_USER_FEATURES = ("recent_item_ids", "recent_labels", "recent_gen_tokens", "last_event_time")
UNKNOWN = [-1, -1, -1]  # L = 3 gen-tokens of a negative saved by the old code
# (user, event_timestamp) -> the new features of the rows batch "b" writes, from the old state:
# user 1: base (compacted by the old code) + detail 20@2600 (+), 30@2900 (-, tok 0), then 10@3400;
# user 2: base + detail 20@3000, then 10@3500 (-); user 3: its parked events, then 20@3450
EXPECTED_NEW = {
    (1, 3400): ([20, 30, 10], [1, 0, 1], [2, 10, 18] + UNKNOWN + [1, 9, 17], 3400),
    (2, 3500): ([20, 10], [1, 0], [2, 10, 18, 1, 9, 17], 3500),
    (3, 190): ([40], [1], [4, 12, 20], 190),
    (3, 210): ([40, 10], [1, 1], [4, 12, 20, 1, 9, 17], 210),
    (3, 3450): ([40, 10, 20], [1, 1, 1], [4, 12, 20, 1, 9, 17, 2, 10, 18], 3450),
}


class Sink:
    def __init__(self):
        self.rows: list[dict] = []

    def write(self, view, rows):
        self.rows += [{"view": view, **r} for r in rows]


def test_state_from_before_the_refactor_loads_and_continues_identically(tmp_path):
    spec = json.loads((FIXTURE / "events.json").read_text())
    expected = json.loads((FIXTURE / "expected.json").read_text())
    state = tmp_path / "state"
    shutil.copytree(FIXTURE / "state", state)
    codec = AvroCodec()
    tokens = {int(k): v for k, v in {**spec["tokens"], **spec["tokens_b"]}.items()}
    sink = Sink()
    lateness = spec["allowed_lateness_s"]
    inter = InteractionProcessor(sink, state, None, tokens.get, "interactions", history_len=spec["history_len"],
                                 park_timeout_s=1e9, allowed_lateness_s=lateness)
    stats = ItemStatsProcessor(sink, state, "interactions_by_item", allowed_lateness_s=lateness)
    inter.assign([0, 1])
    stats.assign([0])
    inter.set_partition_count(2)
    counts = []
    for chunk in spec["b"]:
        recs = [SourceRecord("interactions", p, off, str(u).encode(),
                             codec.encode(InteractionEvent(f"r{p}-{off}", u, i, lab, t).to_record(), "InteractionEvent"))
                for p, off, u, i, lab, t in chunk]
        res = inter.process(recs)
        off0 = stats.hwm(0) + 1
        sres = stats.process([SourceRecord("interactions_by_item", 0, off0 + k, key, v)
                              for k, (key, v) in enumerate(res.outputs)])
        stats.save(sres.hwm)
        inter.save(res.hwm)
        counts.append([res.applied, res.parked, res.duplicates, res.skipped, len(res.dead),
                       sres.applied, sres.duplicates])
    res = inter.retry_parked()
    counts.append([res.applied, res.parked, res.duplicates, res.skipped, len(res.dead)])
    inter.save(res.hwm)
    assert counts == expected["counts"]
    # the old features: exactly what the old code wrote
    assert [{k: r[k] for k in old} for r, old in zip(sink.rows, expected["rows"])] == expected["rows"]
    assert len(sink.rows) == len(expected["rows"])
    new = {(r["user_id"], r["event_timestamp"]): tuple(r[k] for k in NEW_USER_FEATURES)
           for r in sink.rows if r["view"] == "user_history"}
    assert new == EXPECTED_NEW
    assert {str(p): o for p, o in inter.commit_positions().items()} == expected["commit_positions"]
    inter.revoke([0, 1])
    stats.revoke([0])

    # later: user 1's detail (the old negative included) is folded into its base, saved in the
    # `users` table's new column, and read back after a restart
    def run(recs):
        res = inter.process([SourceRecord("interactions", p, off, str(u).encode(), codec.encode(
            InteractionEvent(f"r{p}-{off}", u, i, lab, t).to_record(), "InteractionEvent"))
            for p, off, u, i, lab, t in recs])
        inter.save(res.hwm)
        return res

    sink.rows.clear()
    inter.assign([1])
    assert run([(1, 8, 1, 30, 0, 5000)]).applied == 1
    u1 = inter.states[1].users[1]
    assert [e[1] for e in u1.events] == [30] and [r[0] for r in u1.base[3]] == [20, 30, 10]  # the rest folded
    inter.revoke([1])
    inter.assign([1])
    assert run([(1, 9, 1, 40, 1, 5100)]).applied == 1
    row = sink.rows[-1]
    assert (row["user_id"], row["event_timestamp"], row["user_n_events"], row["hist_item_ids"]) == \
        (1, 5100, 7, [20, 10, 40])
    assert tuple(row[k] for k in NEW_USER_FEATURES) == (
        [20, 30, 10, 30, 40], [1, 0, 1, 0, 1], [2, 10, 18] + UNKNOWN + [1, 9, 17, 3, 11, 19, 4, 12, 20], 5100)
    inter.revoke([1])
