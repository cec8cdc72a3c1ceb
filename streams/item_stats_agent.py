"""Item-stats agent: exact per-item counters from the item-keyed repartition topic.

`interactions` is keyed by user_id, so one item's events are spread over every partition. The
interaction agent forwards each interaction it accepts (not late, not a duplicate; parked ones
too: counters need no tokens) to `interactions_by_item`, keyed by item_id, acknowledged before it
saves its state and commits (`BatchLoop._process_and_commit`). Here every event of an item
arrives on one partition, owned by one worker, so the counts need nobody else's state — exact
with any number of workers.

What one batch computes (when it is written, saved and committed: `BatchLoop._process_and_commit`):
  1. decode    – framed Avro `InteractionByItem`; bad bytes become dead letters
  2. compute   – skip offsets <= the partition's high-water mark; in event-time order, drop
                 copies (a replay of the interaction agent between its produce and its commit
                 re-sends a batch: same (user_id, item_id, event_time, label)) and count the rest
                 in the item's `ItemEvents` (state/item_counts.py: `ItemStatsState`)
  3. write     – Feast `item_stats`: for each item of the batch, one row per distinct event time
                 >= the batch's earliest event of the item, counting the events with event_time
                 <= t (a late event re-stamps the item's later rows)
A crash before the state save replays the batch from the saved state: the same rows again.
"""
from __future__ import annotations

import bisect
from pathlib import Path

from .contract.codec import AvroCodec, DecodeError
from .dlq import DeadLetter, SourceRecord
from .partitioned import PartitionedProcessor
from .processor import BatchResult
from .state import DEFAULT_ALLOWED_LATENESS_S, ItemStatsState

RECORD = "InteractionByItem"


class ItemStatsProcessor(PartitionedProcessor):
    """Not thread-safe: one thread (the loop's)."""

    def __init__(self, sink, state_dir: str | Path, topic: str,
                 allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S, codec: AvroCodec | None = None):
        self.sink = sink
        self.state_dir = Path(state_dir)
        self.topic = topic
        self.allowed_lateness_s = allowed_lateness_s
        self.codec = codec or AvroCodec()
        self.states: dict[int, ItemStatsState] = {}

    def open_state(self, path: Path) -> ItemStatsState:
        return ItemStatsState(path, self.allowed_lateness_s)

    def process(self, records: list[SourceRecord]) -> BatchResult:
        res = BatchResult()
        todo = []
        for r in records:
            if not self.admit(r, res):
                continue
            try:
                d = self.codec.decode(r.value, expect=RECORD)
                todo.append((d["event_time"], r.partition, r.offset, d["user_id"], d["item_id"], d["label"],
                             d["src_partition"], d["src_watermark"], d["src_partitions"]))
            except DecodeError as exc:
                res.dead.append(DeadLetter(r, f"decode: {exc}"))
            except (KeyError, TypeError) as exc:
                res.dead.append(DeadLetter(r, f"invalid: missing or mistyped field {exc}"))
        todo.sort(key=lambda x: x[:3])
        tmin: dict[tuple[int, int], int | None] = {}  # (partition, item) -> earliest time to re-stamp
        for t, part, _, uid, iid, label, src, src_wm, n_src in todo:
            how = self.states[part].accept(uid, iid, t, label, src, src_wm, n_src)
            if how == "dup":
                res.duplicates += 1
                continue
            res.applied += 1
            key = (part, iid)
            if how == "folded":
                res.folded += 1
                tmin[key] = None  # every detail time
            elif key not in tmin:
                tmin[key] = t
        if tmin:
            self.sink.write("item_stats", self._rows(tmin))
        return res

    def _rows(self, tmin: dict[tuple[int, int], int | None]) -> list[dict]:
        rows = []
        for (part, iid), t0 in tmin.items():
            evs = self.states[part].items[iid]
            times, cum = evs.times, evs.cum_pos
            k = 0 if t0 is None else bisect.bisect_left(times, t0)
            for j in range(k, len(times)):
                if j + 1 == len(times) or times[j + 1] != times[j]:  # one row per distinct time
                    rows.append({"item_id": iid, "event_timestamp": times[j], "item_n_interactions": evs.base_n + j + 1,
                                 "item_n_positives": cum[j]})
        return rows

