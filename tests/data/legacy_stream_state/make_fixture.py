"""Writes this fixture with the code BEFORE the structure refactor (commit 495df4e):

    git worktree add /tmp/old 495df4e
    cd /tmp/old && PYTHONPATH=/tmp/old /path/to/.venv/bin/python \
        /path/to/tests/data/legacy_stream_state/make_fixture.py /path/to/tests/data/legacy_stream_state

It drives the interaction and item-stats processors (no Kafka, a dict sink) over `events.json`
batch "a" (compaction, a late event, a duplicate, a parked interaction), saves their per-partition
SQLite state into state/, then runs batch "b" on top and records what it wrote in expected.json.
tests/test_legacy_formats.py loads state/ with today's code, runs batch "b" and compares.
"""
import json
import shutil
import sys
from pathlib import Path

from streams.codec import AvroCodec
from streams.dlq import SourceRecord
from streams.events import InteractionEvent
from streams.interaction_agent import InteractionProcessor
from streams.item_stats_agent import ItemStatsProcessor

out = Path(sys.argv[1])
spec = json.loads((out / "events.json").read_text())
codec = AvroCodec()


class Sink:
    def __init__(self):
        self.rows = []

    def write(self, view, rows):
        self.rows += [{"view": view, **r} for r in rows]


def records(batch):
    return [SourceRecord("interactions", p, off, str(u).encode(),
                         codec.encode(InteractionEvent(f"r{p}-{off}", u, i, lab, t).to_record(), "InteractionEvent"))
            for p, off, u, i, lab, t in batch]


def run(state, batch, tokens):
    sink = Sink()
    inter = InteractionProcessor(sink, state, None, tokens.get, "interactions", history_len=spec["history_len"],
                                 park_timeout_s=1e9, allowed_lateness_s=spec["allowed_lateness_s"])
    stats = ItemStatsProcessor(sink, state, "interactions_by_item", allowed_lateness_s=spec["allowed_lateness_s"])
    inter.assign([0, 1])
    stats.assign([0])
    inter.set_partition_count(2)
    counts = []
    for chunk in batch:
        res = inter.process(records(chunk))
        off0 = stats.hwm(0) + 1
        by_item = [SourceRecord("interactions_by_item", 0, off0 + k, key, v) for k, (key, v) in enumerate(res.outputs)]
        sres = stats.process(by_item)
        stats.save(sres.hwm)
        inter.save(res.hwm)
        counts.append([res.applied, res.parked, res.duplicates, res.skipped, len(res.dead), sres.applied, sres.duplicates])
    return inter, stats, sink, counts


tokens = {int(k): v for k, v in spec["tokens"].items()}
state = out / "state"
shutil.rmtree(state, ignore_errors=True)
inter, stats, _, _ = run(state, spec["a"], tokens)
inter.revoke([0, 1])
stats.revoke([0])
# keep the fixture as the old code left it; run "b" on a copy
work = out / ".work"
shutil.rmtree(work, ignore_errors=True)
shutil.copytree(state, work)
tokens.update({int(k): v for k, v in spec["tokens_b"].items()})
inter, stats, sink, counts = run(work, spec["b"], tokens)
res = inter.retry_parked()
counts.append([res.applied, res.parked, res.duplicates, res.skipped, len(res.dead)])
inter.save(res.hwm)
(out / "expected.json").write_text(json.dumps({"rows": sink.rows, "counts": counts,
                                               "commit_positions": inter.commit_positions()}, indent=0))
inter.revoke([0, 1])
stats.revoke([0])
shutil.rmtree(work)
for f in state.glob("*-wal"):
    f.unlink()
print("wrote", out)
