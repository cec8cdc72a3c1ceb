"""Interaction agent: per-user recent positive history *as tokens*, per-item counters, co-like pairs.

Processing order of one batch (the worker loop in `batch_loop.py` drives it):
  1. decode    – framed Avro -> InteractionEvent; bad bytes/content become dead letters
  2. compute   – skip offsets <= the partition's high-water mark (already applied); apply the
                 rest in event-time order to the in-memory state; an interaction whose item has
                 no tokens yet is *parked* (with its original bytes) and so is every later one of
                 the same user, to keep each user's history in order
  3. write     – Feast online + offline rows, each stamped with the event time that produced it
                 (offline: one row per (entity, event time); online: the entity's latest), and the
                 batch's co-like pairs; files are flushed (renamed into place) before returning
  4. produce   – dead letters to `interactions.dlq`, awaiting acks
  5. commit    – save state + high-water mark (one SQLite transaction), then commit offsets
A crash between 3 and 5 replays the batch from the saved state: the same values are written
again (idempotent). A crash between the state save and the offset commit replays offsets that
are <= hwm, which are skipped, so counters never double count.

Parked interactions retry whenever new item tokens arrive and on idle polls; one parked longer
than `park_timeout_s` is dead-lettered with the reason, and the user's queue moves on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .codec import AvroCodec, DecodeError
from .dlq import DeadLetter, SourceRecord
from .events import InteractionEvent, InvalidEvent
from .pairs import PairWriter
from .state import Parked, PartitionState, read_item_counts


@dataclass
class BatchResult:
    dead: list[DeadLetter] = field(default_factory=list)
    outputs: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (key, value) to the output topic
    applied: int = 0
    parked: int = 0
    skipped: int = 0  # <= hwm: already applied before a restart
    hwm: dict[int, int] = field(default_factory=dict)  # partition -> last offset seen in this batch


class InteractionProcessor:
    """Pure computation + Feast/pair writes; the async loop owns Kafka. Not thread-safe: one thread."""

    def __init__(self, sink, state_dir: str | Path, pairs_dir: str | Path | None,
                 tokens_of: Callable[[int], list[int] | None], topic: str, history_len: int = 20,
                 pair_window: int = 5, park_timeout_s: float = 300.0, codec: AvroCodec | None = None):
        self.sink = sink
        self.state_dir = Path(state_dir)
        self.pairs = PairWriter(pairs_dir) if pairs_dir else None
        self.tokens_of = tokens_of
        self.topic = topic
        self.history_len = history_len
        self.pair_window = pair_window
        self.park_timeout_s = park_timeout_s
        self.codec = codec or AvroCodec()
        self._schema_check = "InteractionEvent"
        self.states: dict[int, PartitionState] = {}

    # -- partitions --
    def state_path(self, partition: int) -> Path:
        return self.state_dir / f"{self.topic}-p{partition}.sqlite"

    def assign(self, partitions: list[int]) -> None:
        for p in partitions:
            if p not in self.states:
                self.states[p] = PartitionState(self.state_path(p), self.history_len)

    def revoke(self, partitions: list[int]) -> None:
        for p in partitions:
            st = self.states.pop(p, None)
            if st is not None:
                st.close()

    def hwm(self, partition: int) -> int:
        return self.states[partition].hwm

    def n_parked(self) -> int:
        return sum(s.n_parked() for s in self.states.values())

    # -- steps 1-3 --
    def process(self, records: list[SourceRecord]) -> BatchResult:
        res = BatchResult()
        todo: list[tuple[int, int, int, InteractionEvent, SourceRecord]] = []
        for r in records:
            st = self.states.get(r.partition)
            if st is None:
                self.assign([r.partition])
                st = self.states[r.partition]
            res.hwm[r.partition] = max(res.hwm.get(r.partition, -1), r.offset)
            if r.offset <= st.hwm:
                res.skipped += 1
                continue
            try:
                ev = InteractionEvent.from_record(self.codec.decode(r.value, expect=self._schema_check))
            except (DecodeError, InvalidEvent) as exc:
                kind = "decode" if isinstance(exc, DecodeError) else "invalid"
                res.dead.append(DeadLetter(r, f"{kind}: {exc}"))
                continue
            except (KeyError, TypeError) as exc:
                res.dead.append(DeadLetter(r, f"invalid: missing or mistyped field {exc}"))
                continue
            todo.append((ev.event_time, r.partition, r.offset, ev, r))
        todo.sort(key=lambda x: x[:3])
        now = time.time()
        changes = _Changes()
        for _, part, off, ev, r in todo:
            st = self.states[part]
            if ev.user_id in st.parked or self.tokens_of(ev.item_id) is None:
                st.park(Parked(off, r.key, r.value, ev.user_id, ev.item_id, ev.label, ev.event_time, now))
                res.parked += 1
                continue
            self._apply(st, ev.user_id, ev.item_id, ev.label, ev.event_time, changes)
            res.applied += 1
        res.applied += self._drain(changes, res, now)
        self._write(changes)
        return res

    def retry_parked(self) -> BatchResult:
        """Apply parked interactions whose item tokens have arrived; dead-letter the overdue."""
        res = BatchResult()
        if not any(s.parked for s in self.states.values()):
            return res
        changes = _Changes()
        res.applied += self._drain(changes, res, time.time())
        self._write(changes)
        return res

    def save(self, hwm: dict[int, int]) -> None:
        """Step 5a: make the state and high-water marks durable (before the offset commit)."""
        for p, st in self.states.items():
            st.save(hwm.get(p))

    # -- internals --
    def _drain(self, changes: "_Changes", res: BatchResult, now: float) -> int:
        applied = 0
        for part, st in self.states.items():
            for uid in list(st.parked):
                q = st.parked[uid]
                while q:
                    p = q[0]
                    if self.tokens_of(p.item_id) is not None:
                        st.unpark(p)
                        self._apply(st, p.user_id, p.item_id, p.label, p.event_time, changes)
                        applied += 1
                    elif now - p.parked_at > self.park_timeout_s:
                        st.unpark(p)
                        res.dead.append(DeadLetter(SourceRecord(self.topic, part, p.offset, p.key, p.value),
                                                   f"no_tokens: item {p.item_id} had no tokens "
                                                   f"{self.park_timeout_s:.0f} s after the interaction arrived"))
                    else:
                        break
                    if uid not in st.parked:
                        break
        return applied

    def _apply(self, st: PartitionState, uid: int, iid: int, label: int, t: int, changes: "_Changes") -> None:
        u = st.user(uid)
        if label and any(h[0] == iid and h[1] == t for h in u.history):
            return  # the same positive (item_id, event_time) twice: a duplicate event, not a new one
        u.n_events += 1
        if label:
            u.n_positives += 1
            if self.pairs is not None:
                for prev_iid, _, _ in list(u.history)[-self.pair_window:]:
                    if prev_iid != iid:
                        changes.pairs.append((min(prev_iid, iid), max(prev_iid, iid), uid, t))
            u.history.append((iid, t, tuple(self.tokens_of(iid))))
            while len(u.history) > self.history_len:
                u.history.popleft()
        st.bump_item(iid, label)
        changes.users[(uid, t)] = {
            "user_id": uid, "event_timestamp": t,
            "hist_gen_tokens": [x for h in u.history for x in h[2]],
            "hist_item_ids": [h[0] for h in u.history],
            "user_n_events": u.n_events, "user_n_positives": u.n_positives}
        changes.item_events.append((iid, t, label))  # totals filled in _write (they sum over partitions)
        changes.item_last[iid] = None

    def _item_totals(self, item_ids: list[int]) -> dict[int, list[int]]:
        tot = {i: [0, 0] for i in item_ids}
        for st in self.states.values():
            for i in item_ids:
                c = st.items.get(i)
                if c:
                    tot[i][0] += c[0]
                    tot[i][1] += c[1]
        # partitions owned by other workers: their saved counters (eventually consistent)
        for f in self.state_dir.glob(f"{self.topic}-p*.sqlite"):
            part = int(f.stem.rsplit("-p", 1)[1])
            if part in self.states:
                continue
            for i, (n, npos) in read_item_counts(f, item_ids).items():
                tot[i][0] += n
                tot[i][1] += npos
        return tot

    def _write(self, changes: "_Changes") -> None:
        if not changes.users and not changes.item_events:
            if self.pairs is not None:
                self.pairs.write(changes.pairs)
            return
        # item counters at each event time: replay this batch's increments onto the pre-batch totals
        totals = self._item_totals(list(changes.item_last))
        item_rows = []
        for iid, t, lab in reversed(changes.item_events):
            c = totals[iid]
            item_rows.append({"item_id": iid, "event_timestamp": t, "item_n_interactions": c[0],
                              "item_n_positives": c[1]})
            c[0] -= 1
            c[1] -= lab
        item_rows.reverse()
        dedup = {}
        for r in item_rows:  # one row per (item, event time): the state after the last such event
            dedup[(r["item_id"], r["event_timestamp"])] = r
        self.sink.write("user_history", list(changes.users.values()))
        self.sink.write("item_stats", list(dedup.values()))
        if self.pairs is not None:
            self.pairs.write(changes.pairs)


class _Changes:
    __slots__ = ("users", "item_last", "pairs", "item_events")

    def __init__(self):
        self.users: dict[tuple[int, int], dict] = {}
        self.item_last: dict[int, None] = {}
        self.pairs: list[tuple[int, int, int, int]] = []
        self.item_events: list[tuple[int, int, int]] = []
