"""The Kafka source of the continuous trainer: the interactions topic -> micro-batches -> `ContinuousTrainer.process`.

The learning loop (trainer.prequential) does not know where events come from; this module only
decides which records form a batch and when Kafka may be told they are done.

Batches are a function of the topic's contents, not of fetch timing. The ordering rule:

1. Every record fetched from an assigned partition is decoded into that partition's buffer, in
   offset order. A record that does not decode as an InteractionEvent is logged and skipped (it
   takes no place in the order; the offsets move past it with the next trained record of its
   partition, as before).
2. Records are released one at a time in the global order of (event_time, partition, offset):
   the smallest buffered key goes next, but only once every assigned partition either has a
   buffered record or is known to have nothing more right now: the consumer's position has
   reached the partition's high watermark, as reported by a fetch response received *after* the
   candidate record arrived (aiokafka's `highwater` / `last_poll_timestamp`; the fetch's high
   watermark, not ListOffsets, which Tansu answers with 1). Each partition is in offset order
   and the producer writes in event-time order, so this merge reproduces the publish order.
3. A batch is the next `batch_size` released records, cut back to the last change of second among
   them: the rest of that second waits for the next batch, so no second is split between two
   batches (a batch is scored, then trained on; trainer/batch.batch_cut), but for the exceptions
   below, where a second's later rows are scored after its earlier rows were learned. A batch that
   would be one second throughout extends to that second's end, known once a record of a later
   second is released, but at most 8 × `batch_size` rows: a longer second (coarse timestamps, a
   backfill) is split there, with a warning, so the released records waiting for a batch stay
   bounded. Otherwise only a partial batch (rule 4) can end inside a second: a run stopped at
   `max_events`, or a stream idle in the middle of a second; the rest of that second then comes in
   the next batch.
   Event times are assumed not to go back (the producer writes in event-time order); a late event
   starts a new group of its second.
4. A shorter (partial) batch, all that is released, is trained only
   a. once `max_events` records are released (at once), or
   b. once the stream has been idle for `partial_after_s`: no record from any partition, every
      partition at its high watermark by a fetch answered at least `partial_after_s` after the
      last record arrived (also when `idle_timeout_s` is reached, before stopping). This is the
      one timing-dependent rule; a run that must be reproducible (the demo) passes a large
      `partial_after_s` and relies on `max_events`.
5. On a rebalance the buffers are dropped and each assigned partition is sought to the end of
   what was already handed to the trainer (at start: the checkpoint), so the merge continues
   from a consistent cut; records buffered but never trained are simply read again.

The other guarantees:

* its own consumer group; on assignment it seeks to the offsets in the checkpoint, never to the
  group's committed ones, and it commits only the offsets of the last durable checkpoint, so a
  crash replays at most the batch that was trained but not yet checkpointed, and skips nothing
  (a restart re-reads what the merge had buffered but not trained: only trained and
  checkpointed offsets ever move);
* with `feature_group` a batch waits until the streams workers have committed past it (their
  features are written), and until their item-stats group has counted what they forwarded, so
  the trainer never outruns the features; after `feature_wait_s` it trains on what is there
  (stale features, never leaked ones) and logs a warning;
* the next batch's PIT join runs in a thread while the current one trains.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from .batch import batch_cut, splits_second
from .prequential import ContinuousTrainer, Record

log = logging.getLogger(__name__)


def _now_ms() -> int:
    """Wall-clock ms, the clock aiokafka stamps fetch responses with (`last_poll_timestamp`)."""
    return int(1000 * time.time())


class EventTimeMerge:
    """Rules 1-2 of the module docstring: per-partition buffers released in (event_time, partition, offset) order.

    `consumer` is the (started, subscribed) AIOKafkaConsumer the records come from; its fetch
    responses say whether a partition without buffered records is drained. A partition holding
    `cap` records is paused until the merge has drained it below that (bounded memory when the
    partitions' event times drift apart).
    """

    def __init__(self, consumer, cap: int = 4096):
        self.consumer = consumer
        self.cap = cap
        self.held: dict = {}  # TopicPartition -> deque[(Record, arrival ms)]
        self.ready: list[Record] = []  # released, not yet in a batch
        self.paused: set = set()

    def add(self, tp, rec: Record, arrival_ms: int) -> None:
        q = self.held.setdefault(tp, deque())
        q.append((rec, arrival_ms))
        if len(q) >= self.cap and tp not in self.paused:
            self.consumer.pause(tp)
            self.paused.add(tp)

    def clear(self) -> None:
        """Drop everything not handed to the trainer (a rebalance: positions are sought again)."""
        self.held.clear()
        self.ready.clear()
        self.paused.clear()

    def held_count(self) -> int:
        return sum(len(q) for q in self.held.values())

    async def drained(self, tp, since_ms: int) -> bool:
        """`tp`'s position is at its high watermark per a fetch answered after `since_ms`."""
        hw = self.consumer.highwater(tp)
        ts = self.consumer.last_poll_timestamp(tp)
        if hw is None or ts is None or ts <= since_ms:
            return False
        return await self.consumer.position(tp) >= hw

    async def release(self, limit: int | None = None) -> int:
        """Move records to `ready` in merge order while rule 2 allows (at most `limit`); how many moved."""
        moved, assigned = 0, self.consumer.assignment()
        while limit is None or moved < limit:
            heads = [(q[0][0].event_time, tp.partition, q[0][0].offset, tp)
                     for tp, q in self.held.items() if q and tp in assigned]
            if not heads:
                break
            *_, tp = min(heads)
            arrival = self.held[tp][0][1]
            blocked = False
            for other in assigned:
                if not self.held.get(other) and not await self.drained(other, arrival):
                    blocked = True
                    break
            if blocked or not self.held.get(tp) or self.consumer.assignment() != assigned:
                break  # (a rebalance while a position was awaited: the merge starts again from its cut)
            self.ready.append(self.held[tp].popleft()[0])
            moved += 1
        for tp in [tp for tp in self.paused if len(self.held.get(tp, ())) < self.cap]:
            self.paused.discard(tp)
            if tp in self.consumer.assignment():
                self.consumer.resume(tp)
        return moved

    async def idle_since(self, since_ms: int) -> bool:
        """Rule 4b: nothing held back and every assigned partition drained per a fetch after `since_ms`."""
        assigned = self.consumer.assignment()
        if not assigned or any(self.held.get(tp) for tp in assigned):
            return False
        for tp in assigned:
            if not await self.drained(tp, since_ms):
                return False
        return True

    def take(self, n: int) -> list[Record]:
        batch, self.ready[:n] = self.ready[:n], []
        return batch


def _decode(codec, msg) -> Record | None:
    from streams.contract.codec import DecodeError
    from streams.contract.events import InteractionEvent, InvalidEvent

    try:
        ev = InteractionEvent.from_record(codec.decode(msg.value, expect="InteractionEvent"))
    except (DecodeError, InvalidEvent, KeyError, TypeError) as exc:
        log.warning("skipping %s:%d@%d: %s", msg.topic, msg.partition, msg.offset, exc)
        return None
    return Record(ev.user_id, ev.item_id, ev.label, ev.event_time, f"{msg.topic}:{msg.partition}", msg.offset)


async def _wait_for_features(gate, records: Sequence[Record], timeout_s: float, by_item=None) -> bool:
    """Until the feature workers' group has committed past every record of the batch.

    The workers commit an offset only after writing the features of the events before it, so
    past that point the PIT join sees every earlier event of the same user. Gives up (stale
    features, never leaked ones) after `timeout_s`; returns whether the workers caught up.

    Item counters are written by the item-stats agent from `interactions_by_item`, which the
    interaction agent produces (acked) before it commits: so once the first gate passes, every
    batch record's forwarded copy is below that topic's current end. `by_item` = (item-stats
    group consumer, reader, topic partitions): wait until that group has committed up to the
    ends seen then. The ends come from a fetch's high watermark (Tansu's ListOffsets answers 1).
    """
    from aiokafka import TopicPartition

    need: dict[str, int] = {}
    for r in records:
        need[r.partition] = max(need.get(r.partition, 0), r.offset + 1)
    deadline = time.monotonic() + timeout_s
    while True:
        behind = []
        for key, off in need.items():
            t, p = key.rsplit(":", 1)
            got = await gate.committed(TopicPartition(t, int(p)))
            if got is None or got < off:
                behind.append((key, got, off))
        if not behind:
            break
        if time.monotonic() > deadline:
            log.warning("feature workers still behind after %.0f s (%s); training on the features there are",
                        timeout_s, behind[:3])
            return False
        await asyncio.sleep(0.2)
    if by_item is None:
        return True
    item_gate, reader, tps = by_item
    for tp in tps:  # one fetch just below the group's position: its response carries the high watermark
        reader.seek(tp, max(0, (await item_gate.committed(tp) or 0) - 1))
    await reader.getmany(timeout_ms=500, max_records=1)
    ends = {tp: reader.highwater(tp) or 0 for tp in tps}
    while True:
        behind = [(tp.partition, got, end) for tp, end in ends.items()
                  if end and ((got := await item_gate.committed(tp)) is None or got < end)]
        if not behind:
            return True
        if time.monotonic() > deadline:
            log.warning("item-stats workers still behind after %.0f s (%s); training on the item counters there are",
                        timeout_s, behind[:3])
            return False
        await asyncio.sleep(0.2)


async def follow(trainer: ContinuousTrainer, kafka, group_id: str = "trm-trainer", batch_size: int = 1024,
                 max_events: int | None = None, idle_timeout_s: float | None = 10.0,
                 linger_s: float = 1.0, topic: str | None = None, feature_group: str | None = None,
                 feature_wait_s: float = 60.0, partial_after_s: float | None = None,
                 consumer_options: dict | None = None) -> int:
    """Consume the interactions topic with its own group, training per micro-batch.

    `kafka` is a streams.kafka_config.KafkaConfig. Batches follow the ordering rule of the module
    docstring. Stops after `max_events` (if given) or after `idle_timeout_s` without a message
    (None: run until cancelled); what was released by then is trained first. A partial batch is
    trained only after `partial_after_s` seconds of real idleness (default: `linger_s`), or at
    `max_events`; the demo passes a large `partial_after_s` (its batches then depend only on the
    topic's contents). `linger_s` is the longest one poll waits while nothing is pending.
    `consumer_options` are extra AIOKafkaConsumer settings (e.g. `max_partition_fetch_bytes`).
    With `feature_group` (the streams workers' interactions group, e.g. "trm-worker-interactions")
    a batch waits until those workers have committed past it, so the trainer never outruns the
    features; and also until the same worker app's item-stats group (`WorkerGroups`,
    streams/contract/topics.py) has counted what they forwarded to `interactions_by_item`.
    Returns events processed.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener

    from streams.contract.codec import AvroCodec
    from streams.contract.topics import INTERACTIONS, INTERACTIONS_BY_ITEM, WorkerGroups

    trainer.resume()
    codec = AvroCodec()
    topic = topic or kafka.topic(INTERACTIONS)
    partial_after_s = linger_s if partial_after_s is None else partial_after_s
    flush_after_s = partial_after_s if idle_timeout_s is None else min(partial_after_s, idle_timeout_s)
    # an empty fetch is answered after fetch_max_wait_ms: the merge waits at most that for a
    # drained partition's fresh high watermark
    options = {"fetch_max_wait_ms": 200, **(consumer_options or {})}
    consumer = AIOKafkaConsumer(
        group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms, heartbeat_interval_ms=max(kafka.session_timeout_ms // 4, 500),
        max_poll_interval_ms=600_000, **options, **kafka.aiokafka_kwargs())
    merge = EventTimeMerge(consumer, cap=max(4 * batch_size, 4096))
    handed: dict[str, int] = dict(trainer.state.offsets)  # per partition: end of what the trainer was given

    class SeekToCheckpoint(ConsumerRebalanceListener):
        """The checkpoint (and what this run handed to the trainer since), not the group's
        committed offset, says where to continue; the merge restarts from that cut (rule 5)."""

        async def on_partitions_revoked(self, revoked) -> None:
            merge.clear()

        async def on_partitions_assigned(self, assigned) -> None:
            merge.clear()
            for tp in assigned:
                off = handed.get(f"{tp.topic}:{tp.partition}")
                if off is not None:
                    consumer.seek(tp, off)

    consumer.subscribe([topic], listener=SeekToCheckpoint())
    await consumer.start()
    trainer.consumer = consumer  # its high watermarks give the consumer lag (trainer/telemetry.py)
    gate = None
    if feature_group:  # reads the workers' committed offsets; never joins their group
        gate = AIOKafkaConsumer(group_id=feature_group, enable_auto_commit=False, **kafka.aiokafka_kwargs())
        await gate.start()
    by_item = None
    workers = WorkerGroups.of_interactions_group(feature_group) if feature_group else None
    if workers is not None:  # the same worker app's item-stats group counts the items
        item_topic = kafka.topic(INTERACTIONS_BY_ITEM)
        # aiokafka has no public metadata refresh: `topics()` answers from a separate copy, so
        # partitions_for_topic would stay empty on a Kafka that sends only the topics asked for
        parts = (await gate._client.fetch_all_metadata()).partitions_for_topic(item_topic)
        if parts:
            item_gate = AIOKafkaConsumer(group_id=workers.item_stats, enable_auto_commit=False,
                                         **kafka.aiokafka_kwargs())
            reader = AIOKafkaConsumer(enable_auto_commit=False, max_partition_fetch_bytes=64 * 1024,
                                      **kafka.aiokafka_kwargs())
            await item_gate.start()
            await reader.start()
            tps = [TopicPartition(item_topic, p) for p in sorted(parts)]
            reader.assign(tps)
            by_item = (item_gate, reader, tps)
    pool = ThreadPoolExecutor(1, thread_name_prefix="trm-join")
    done = 0
    inflight: tuple[list[Record], Future] | None = None  # joined (or joining) while the previous batch trains
    last_commit: dict = {}

    def taken() -> int:
        return done + (len(inflight[0]) if inflight else 0)

    async def commit_checkpointed() -> None:
        """Commit the offsets of the last durable checkpoint (never of a batch not yet in one)."""
        nonlocal last_commit
        offsets = {}
        for key, off in trainer.checkpointed_offsets.items():
            t, p = key.rsplit(":", 1)
            if t == topic:
                offsets[TopicPartition(t, int(p))] = off
        if offsets and offsets != last_commit:
            await consumer.commit(offsets)
            last_commit = offsets

    async def train_inflight() -> None:
        nonlocal inflight, done
        recs, fut = inflight
        inflight = None
        await asyncio.to_thread(trainer.process, recs, fut)  # heartbeats keep running meanwhile
        done += len(recs)
        await commit_checkpointed()

    async def hand_over(batch: list[Record]) -> None:
        nonlocal inflight
        for r in batch:
            handed[r.partition] = max(handed.get(r.partition, 0), r.offset + 1)
        if gate is not None:
            await _wait_for_features(gate, batch, feature_wait_s, by_item)
        joining = (batch, pool.submit(trainer.join, batch))
        if inflight is not None:
            await train_inflight()  # batch k trains while batch k+1 joins
        inflight = joining

    last_msg, last_data_ms = time.monotonic(), _now_ms()
    try:
        while max_events is None or taken() < max_events:
            pending = merge.ready or merge.held_count() or inflight is not None
            timeout_s = min(linger_s, 0.1) if pending else linger_s
            data = await consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max(batch_size, 1))
            arrival = _now_ms()
            for tp, msgs in data.items():
                for m in msgs:
                    rec = _decode(codec, m)
                    if rec is not None:
                        merge.add(tp, rec, arrival)
            if data:
                last_msg, last_data_ms = time.monotonic(), arrival
                log.debug("fetched %s", {tp.partition: len(msgs) for tp, msgs in data.items()})
            await merge.release(None if max_events is None else max_events - taken() - len(merge.ready))
            while k := batch_cut(seconds := [r.event_time for r in merge.ready], batch_size):
                if splits_second(seconds, k):
                    log.warning("second %d holds more than %d events: split between micro-batches (rule 3)",
                                seconds[k], k)
                await hand_over(merge.take(k))  # rule 3
            if merge.ready and ((max_events is not None and taken() + len(merge.ready) >= max_events)
                                or await merge.idle_since(last_data_ms + int(1000 * flush_after_s))):
                await hand_over(merge.take(len(merge.ready)))  # rule 4: a partial batch
            if inflight is not None and not data:
                await train_inflight()  # the stream paused: don't hold a joined batch back
            elif (idle_timeout_s is not None and not merge.ready and inflight is None
                  and time.monotonic() - last_msg > idle_timeout_s):
                if merge.held_count():
                    log.warning("stopping with %d records held back by the merge (read again next run)",
                                merge.held_count())
                break
        if inflight is not None:
            await train_inflight()
        await asyncio.to_thread(trainer.finish)  # stopping: checkpoint and publish what was trained
        await commit_checkpointed()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        trainer.consumer = None
        await consumer.stop()
        if gate is not None:
            await gate.stop()
        if by_item is not None:
            await by_item[0].stop()
            await by_item[1].stop()
    return done


def follow_sync(trainer: ContinuousTrainer, kafka, **kw) -> int:
    return asyncio.run(follow(trainer, kafka, **kw))
