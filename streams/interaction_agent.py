"""Interaction agent: per-user recent positive history *as tokens*, the user's recent labelled events
(positives and negatives, with tokens), co-like pairs, and the item-keyed
repartition of the accepted interactions (`interactions_by_item`, counted by item_stats_agent.py).

What one batch computes (when each effect is written, produced, saved and committed:
`BatchLoop._process_and_commit`):
  1. decode    – framed Avro -> InteractionEvent; bad bytes/content become dead letters
  2. compute   – skip offsets <= the partition's high-water mark (already applied); apply the
                 rest in event-time order to the in-memory state:
                 a. *late*: an event older than the partition's watermark (newest event time
                    accepted) minus `allowed_lateness_s` is dead-lettered (`late: ...`): state that
                    old is compacted, it cannot be placed exactly (state/user_history.py)
                 b. *duplicate*: the same (user_id, item_id, event_time, label) as an accepted
                    event is a no-op (counted in `duplicates`): not in item counters, user
                    features or pairs, parked or not; the dedup set is part of the saved state
                 c. every accepted interaction is forwarded at once to `interactions_by_item`
                    (keyed by item_id, with this partition and its watermark): item counters
                    need no tokens, the item-stats agent counts them. User features need the
                    item's gen-tokens: an interaction whose item has no tokens yet is *parked*
                    (with its original bytes), and so is every later one of the same user,
                    keeping each history in order; the rest is applied to its user
                    (`PartitionState.apply`: the history rules live there)
  3. write     – Feast online + offline rows, each stamped with the event time that produced it
                 (offline: one row per (entity, event time); online: the entity's latest), and the
                 batch's co-like pairs; files are flushed (renamed into place) before returning
A crash after the Feast write and before the state save replays the batch from the saved state:
the same values are written again (idempotent) and the forwarded interactions are sent again (the
item-stats agent drops the copies). A crash between the state save and the offset commit replays
offsets that are <= hwm, which are skipped (nothing forwarded twice from them). Offsets are
committed per partition only up to its first parked interaction (`commit_positions`).

Parked interactions retry whenever new item tokens arrive and on idle polls; one parked longer
than `park_timeout_s` is dead-lettered with the reason, and the user's queue moves on.

Rotation (streams/rotation.py, with a `RotationWatch`): an event at t takes the tokens of the
artifact of t (`tokens_in(item, version)`). An event at or after the rotation time that arrives
before the backfill is done (*mid-rotation*) is accepted and forwarded to the item counters as any
other, and parked for its user until the record says `backfilled` and the token cache has read every
item_tokens record the backfill sent (the record's `tokens_through`; the backfill marks the record
before this worker's consumer has fetched them): it waits however long that takes (no timeout), so
it is neither lost nor counted twice, and its row never mixes the old artifact's tokens in. Every
user row at or after the rotation time shows the new artifact's tokens for all its events (`user_row`'s `retoken`) and
carries its `tokenizer_version`.

Point in time: a row stamped at t reflects exactly the events with event_time <= t: a user row at t
is the state after the user's events <= t. An event applied late (out of order for its user, or
parked) is inserted at its event-time position and re-stamps the entity's rows
at every event time >= its own; a re-stamped row has a later `created`, which wins the offline
point-in-time join (latest event_timestamp, then latest created). Pairs of a late positive are
added with the positives around it in event time; pairs already written are not retracted.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .contract.codec import AvroCodec, DecodeError
from .contract.events import InteractionEvent, InvalidEvent
from .dlq import DeadLetter, SourceRecord
from .pairs import PairWriter
from .partitioned import PartitionedProcessor
from .processor import BatchResult
from .rotation import Rotation, RotationWatch
from .state import DEFAULT_ALLOWED_LATENESS_S, DEFAULT_RECENT_LEN, Parked, PartitionState


def by_item_record(codec: AvroCodec, schema_id: int, uid: int, iid: int, label: int, t: int, src: int,
                   src_wm: int, n_src: int) -> tuple[bytes, bytes]:
    """(key, value) of a repartitioned interaction (what the interaction agent produces)."""
    return str(iid).encode(), codec.encode({"user_id": uid, "item_id": iid, "label": label, "event_time": t,
                                            "src_partition": src, "src_watermark": src_wm,
                                            "src_partitions": n_src}, schema_id=schema_id)


class InteractionProcessor(PartitionedProcessor):
    """Pure computation + Feast/pair writes; the async loop owns Kafka. Not thread-safe: one thread."""

    parks = True

    def __init__(self, sink, state_dir: str | Path, pairs_dir: str | Path | None,
                 tokens_of: Callable[[int], list[int] | None], topic: str, history_len: int = 20,
                 recent_len: int = DEFAULT_RECENT_LEN, pair_window: int = 5, park_timeout_s: float = 300.0,
                 codec: AvroCodec | None = None, allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S,
                 rotation: RotationWatch | None = None, tokens_in: Callable[[int, str], list[int] | None] | None = None,
                 version_now: Callable[[], str | None] | None = None,
                 tokens_position: Callable[[int], int] | None = None):
        self.sink = sink
        self.rotation = rotation
        # (item, artifact version) -> gen-tokens, for a rotation (TokenCache.get_version)
        self.tokens_in = tokens_in or (lambda iid, version: tokens_of(iid))
        self.version_now = version_now  # the artifact of the tokens when no rotation is recorded
        # item_tokens partition -> how far the token cache has read (TokenCache.position)
        self.tokens_position = tokens_position
        self._rot: Rotation | None = None
        self.state_dir = Path(state_dir)
        self.pairs = PairWriter(pairs_dir) if pairs_dir else None
        self.tokens_of = tokens_of
        self.topic = topic
        self.history_len = history_len
        self.recent_len = recent_len
        self.pair_window = pair_window
        self.park_timeout_s = park_timeout_s
        self.allowed_lateness_s = allowed_lateness_s
        self.codec = codec or AvroCodec()
        self._schema_check = "InteractionEvent"
        self._by_item_sid = self.codec.registry.write_id("InteractionByItem")
        self.states: dict[int, PartitionState] = {}
        self.n_partitions: int | None = None  # of the input topic; the loop tells (set_partition_count)

    def set_partition_count(self, n: int) -> None:
        self.n_partitions = n or None

    # -- partitions --
    def open_state(self, path: Path) -> PartitionState:
        st = PartitionState(path, self.history_len, self.allowed_lateness_s, recent_len=self.recent_len)
        st.retoken_at, st.version_at = self._retoken_at, self._version_at
        return st

    def assign(self, partitions: list[int]) -> None:
        super().assign(partitions)
        import gc

        gc.freeze()  # loaded state is long-lived: keep the collector from rescanning it (see app.tune_gc)

    def commit_positions(self, ends: dict[int, int] | None = None) -> dict[int, int]:
        """Per partition, the offset safe to commit: the first parked one, else past the hwm — so
        a committed offset means every earlier interaction is in Feast or dead-lettered (what a
        reader gating on it, the trainer, needs). The batch's `ends` do not matter."""
        out = {}
        for p, st in self.states.items():
            first_parked = min((q[0].offset for q in st.parked.values()), default=None)
            out[p] = first_parked if first_parked is not None else st.hwm + 1
        return out

    def n_parked(self) -> int:
        return sum(s.n_parked() for s in self.states.values())

    # -- a batch --
    def process(self, records: list[SourceRecord]) -> BatchResult:
        res = BatchResult()
        rot = self._follow_rotation()
        todo: list[tuple[int, int, int, InteractionEvent, SourceRecord]] = []
        for r in records:
            if not self.admit(r, res):
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
        users, pairs, window = changes.users, changes.pairs, self._window()
        outputs, sid = res.outputs, self._by_item_sid
        tokens_of = self.tokens_of
        n_src = self.n_partitions or max(self.states, default=0) + 1
        # the oldest event time each partition can still place exactly: in event-time order, the
        # watermark moving within the batch never makes a later event of the batch late
        floors = {p: st.floor() for p, st in self.states.items()}
        for _, part, off, ev, r in todo:
            st = self.states[part]
            t = ev.event_time
            if t < floors[part]:
                res.dead.append(DeadLetter(r, st.late(t)))
                continue
            if not st.accept(ev.user_id, ev.item_id, t, ev.label):
                res.duplicates += 1
                continue
            # item counters need no tokens: forwarded at once, keyed by item (item_stats_agent.py)
            outputs.append(by_item_record(self.codec, sid, ev.user_id, ev.item_id, ev.label, t, part, st.watermark,
                                          n_src))
            # user features need the item's tokens, and each user's events in order
            toks = tokens_of(ev.item_id) if rot is None else self._tokens(ev.item_id, t)
            if ev.user_id in st.parked or toks is None:
                st.park(Parked(off, r.key, r.value, ev.user_id, ev.item_id, ev.label, t, now))
                res.parked += 1
                continue
            near = st.apply(ev.user_id, ev.item_id, ev.label, t, toks, users, window)
            if near is not None:
                _add_pairs(pairs, ev.user_id, ev.item_id, t, near)
            res.applied += 1
        res.applied += self._drain(changes, res, now)
        self._write(changes)
        return res

    def retry_parked(self) -> BatchResult:
        """Apply parked interactions whose item tokens have arrived; dead-letter the overdue."""
        res = BatchResult()
        if not any(s.parked for s in self.states.values()):
            return res
        self._follow_rotation()
        changes = _Changes()
        res.applied += self._drain(changes, res, time.time())
        self._write(changes)
        return res

    # -- rotation (streams/rotation.py) --
    def _follow_rotation(self) -> Rotation | None:
        """The current rotation record (re-read when it changed), or None."""
        self._rot = self.rotation.current() if self.rotation is not None else None
        return self._rot

    def _tokens(self, iid: int, t: int) -> list[int] | None:
        """The item's gen-tokens for an event at `t`, or None: not there yet (the event parks). Across
        a rotation: the artifact of `t`'s, and none at or after its time until the backfill is done."""
        rot = self._rot
        if rot is None:
            return self.tokens_of(iid)
        if self._waits(rot, t):
            return None
        return self.tokens_in(iid, rot.version_at(t))

    def _waits(self, rot: Rotation, t: int) -> bool:
        """An event at `t` waits for the backfill: until the record is marked and this worker's token
        cache has read every item_tokens record the backfill sent."""
        if rot.waits(t):
            return True
        return t >= rot.at and self.tokens_position is not None and not rot.tokens_read(self.tokens_position)

    def _retoken_at(self, t: int):
        """For a user row at `t` at or after the rotation time: item -> the new artifact's tokens."""
        rot = self._rot
        if rot is None or t < rot.at:
            return None
        version, tokens_in = rot.to_version, self.tokens_in
        return lambda iid: tokens_in(iid, version)

    def _parked_since(self, p: Parked) -> float:
        """When the park timeout starts: a mid-rotation event's wait for the backfill is not its
        item's fault, so its clock starts when the backfill finished."""
        rot = self._rot
        if rot is not None and rot.backfilled_at is not None and p.event_time >= rot.at:
            return max(p.parked_at, rot.backfilled_at)
        return p.parked_at

    def _version_at(self, t: int) -> str | None:
        rot = self._rot
        if rot is not None:
            return rot.version_at(t)
        return self.version_now() if self.version_now is not None else None

    # -- internals --
    def _window(self) -> int:
        """How many positives around an applied one it pairs with (0: no pairs are written)."""
        return self.pair_window if self.pairs is not None else 0

    def _drain(self, changes: "_Changes", res: BatchResult, now: float) -> int:
        """Unpark every user's longest prefix whose items now have tokens, applied in event-time order."""
        ready: list[tuple[int, int, int, PartitionState, Parked]] = []
        for part, st in self.states.items():
            for uid, q in list(st.parked.items()):
                for p in list(q):
                    if self._tokens(p.item_id, p.event_time) is not None:
                        ready.append((p.event_time, part, p.offset, st, p))
                    elif self._rot is not None and self._waits(self._rot, p.event_time):
                        break  # mid-rotation: waits for the backfill, however long (never dead-lettered)
                    elif now - self._parked_since(p) > self.park_timeout_s:
                        ready.append((p.event_time, part, p.offset, st, p))  # dead-lettered below, in order
                    else:
                        break
        ready.sort(key=lambda x: x[:3])
        applied = 0
        window = self._window()
        for _, part, _, st, p in ready:
            st.unpark(p)
            toks = self._tokens(p.item_id, p.event_time)
            if toks is None:
                res.dead.append(DeadLetter(SourceRecord(self.topic, part, p.offset, p.key, p.value),
                                           f"no_tokens: item {p.item_id} had no tokens {self.park_timeout_s:.0f} s "
                                           f"after the interaction arrived; user history skipped it "
                                           f"(item counters include it: forwarded when accepted)"))
                continue
            near = st.apply(p.user_id, p.item_id, p.label, p.event_time, toks, changes.users, window, parked=True)
            if near is not None:
                _add_pairs(changes.pairs, p.user_id, p.item_id, p.event_time, near)
            applied += 1
        return applied

    def _write(self, changes: "_Changes") -> None:
        if changes.users:
            self.sink.write("user_history", list(changes.users.values()))
        if self.pairs is not None:
            self.pairs.write(*changes.pairs)


def _add_pairs(pairs: tuple, uid: int, iid: int, t: int, near: tuple) -> None:
    """Co-like pairs of positive `iid` at `t` with its neighbours (PartitionState.apply): one per
    other item, (smaller id, larger id), stamped with the later positive's event time."""
    pa_, pb, pu, pt = pairs
    before, after = near
    for prev in before:
        if prev != iid:
            if prev < iid:
                pa_.append(prev)
                pb.append(iid)
            else:
                pa_.append(iid)
                pb.append(prev)
            pu.append(uid)
            pt.append(t)
    for nxt, tn in after:
        if nxt != iid:
            pa_.append(min(iid, nxt))
            pb.append(max(iid, nxt))
            pu.append(uid)
            pt.append(tn)


class _Changes:
    __slots__ = ("users", "pairs")

    def __init__(self):
        self.users: dict[tuple[int, int], dict] = {}
        self.pairs: tuple[list[int], ...] = ([], [], [], [])  # item_a, item_b, user_id, event_time
