"""Worker state written before the structure refactor still loads and behaves the same.

tests/data/legacy_stream_state/ holds the per-partition SQLite state that the interaction and
item-stats processors of commit 495df4e left after batch "a" of events.json (compaction, a late
event, a duplicate, a parked interaction), and what that code wrote for batch "b" on top of it
(make_fixture.py there says how it was made). Today's processors open a copy of that state, run
batch "b", and must write the same feature rows, report the same counts and commit positions.
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
    assert sink.rows == expected["rows"]
    assert {str(p): o for p, o in inter.commit_positions().items()} == expected["commit_positions"]
    inter.revoke([0, 1])
    stats.revoke([0])
