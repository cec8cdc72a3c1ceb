"""The Kafka source of the continuous trainer: the interactions topic -> micro-batches -> `ContinuousTrainer.process`.

The learning loop (trainer.prequential) does not know where events come from; this module only
decides which records form a batch and when Kafka may be told they are done:

* its own consumer group; on assignment it seeks to the offsets in the checkpoint, never to the
  group's committed ones, and it commits only the offsets of the last durable checkpoint, so a
  crash replays at most the batch that was trained but not yet checkpointed, and skips nothing;
* with `feature_group` a batch waits until the streams workers have committed past it (their
  features are written), and until their item-stats group has counted what they forwarded, so
  the trainer never outruns the features; after `feature_wait_s` it trains on what is there
  (stale features, never leaked ones) and logs a warning;
* a record that does not decode as an InteractionEvent is logged and skipped;
* the next batch's PIT join runs in a thread while the current one trains.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from .prequential import ContinuousTrainer, Record

log = logging.getLogger(__name__)


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
                 feature_wait_s: float = 60.0) -> int:
    """Consume the interactions topic with its own group, training per micro-batch.

    `kafka` is a streams.kafka_config.KafkaConfig. Stops after `max_events` (if given) or after
    `idle_timeout_s` without a message (None: run until cancelled). With `feature_group` (the
    streams workers' interactions group, e.g. "trm-worker-interactions") a batch waits until those
    workers have committed past it, so the trainer never outruns the features; and also until the
    same worker app's item-stats group (`WorkerGroups`, streams/contract/topics.py) has counted
    what they forwarded to `interactions_by_item`. Returns events processed.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener

    from streams.contract.codec import AvroCodec
    from streams.contract.topics import INTERACTIONS, INTERACTIONS_BY_ITEM, WorkerGroups

    trainer.resume()
    codec = AvroCodec()
    topic = topic or kafka.topic(INTERACTIONS)
    consumer = AIOKafkaConsumer(
        group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms, heartbeat_interval_ms=max(kafka.session_timeout_ms // 4, 500),
        max_poll_interval_ms=600_000, **kafka.aiokafka_kwargs())

    class SeekToCheckpoint(ConsumerRebalanceListener):
        """The checkpoint, not the group's committed offset, says where to continue."""

        async def on_partitions_revoked(self, revoked) -> None:
            pass

        async def on_partitions_assigned(self, assigned) -> None:
            for tp in assigned:
                off = trainer.state.offsets.get(f"{tp.topic}:{tp.partition}")
                if off is not None:
                    consumer.seek(tp, off)

    consumer.subscribe([topic], listener=SeekToCheckpoint())
    await consumer.start()
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
    done, buf = 0, []
    inflight: tuple[list[Record], Future] | None = None  # joined (or joining) while the previous batch trains
    last_commit: dict = {}

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

    last_msg = time.monotonic()
    try:
        while max_events is None or done + (len(inflight[0]) if inflight else 0) + len(buf) < max_events:
            taken = done + (len(inflight[0]) if inflight else 0)
            want = batch_size - len(buf) if max_events is None else min(batch_size - len(buf), max_events - taken - len(buf))
            data = await consumer.getmany(timeout_ms=int(linger_s * 1000), max_records=max(want, 1))
            for msgs in data.values():
                for m in msgs:
                    rec = _decode(codec, m)
                    if rec is not None:
                        buf.append(rec)
            if data:
                last_msg = time.monotonic()
            full = len(buf) >= batch_size or (max_events is not None and taken + len(buf) >= max_events)
            if buf and (full or not data):
                if gate is not None:
                    await _wait_for_features(gate, buf, feature_wait_s, by_item)
                joining = (buf, pool.submit(trainer.join, buf))
                buf = []
                if inflight is not None:
                    await train_inflight()  # batch k trains while batch k+1 joins
                inflight = joining
            elif inflight is not None and not data:
                await train_inflight()  # the stream paused: don't hold a joined batch back
            elif idle_timeout_s is not None and not buf and time.monotonic() - last_msg > idle_timeout_s:
                break
        if inflight is not None:
            await train_inflight()
        if trainer._pending:
            await asyncio.to_thread(trainer.checkpoint)
            await commit_checkpointed()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        await consumer.stop()
        if gate is not None:
            await gate.stop()
        if by_item is not None:
            await by_item[0].stop()
            await by_item[1].stop()
    return done


def follow_sync(trainer: ContinuousTrainer, kafka, **kw) -> int:
    return asyncio.run(follow(trainer, kafka, **kw))
