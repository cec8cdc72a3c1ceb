"""Publish item and interaction events to Kafka (kafka-python), in event-time order.

A send counts only once the broker acknowledged it: the publisher flushes and checks every
future, so it never reports success for records that were not written (acks=all, retries on).

Broker outages: kafka-python reconnects with backoff and resends, so an outage shorter than
`delivery_timeout_ms` (45 s here) costs only time; a longer one fails the unacknowledged
records' futures and `publish_events` raises `PublishError` with how many were not written
(measured in tests/test_faults_broker_restart.py). A resend may repeat a record the broker had
written but not acknowledged: delivery is at-least-once, and the interaction agent drops the
duplicate.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from streams.errors import StreamsError
from streams.kafka_config import KafkaConfig

from .contract.codec import AvroCodec
from .contract.events import InteractionEvent, ItemEvent
from .contract.topics import INTERACTIONS, ITEMS


class PublishError(StreamsError, RuntimeError):
    pass


@dataclass
class PublishResult:
    topic: str
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


def make_producer(config: KafkaConfig, **overrides):
    from kafka import KafkaProducer

    # delivery_timeout_ms bounds how long an unacknowledged record may wait (kafka-python's default
    # is 2 min); after it, its future fails and publish_events raises instead of reporting success
    kw = dict(acks="all", retries=5, linger_ms=5, batch_size=256 * 1024, max_in_flight_requests_per_connection=1,
              request_timeout_ms=15_000, delivery_timeout_ms=45_000, client_id="trm-publisher")
    kw.update(overrides)
    return KafkaProducer(**config.kafka_python_kwargs(), **kw)


def publish_events(config: KafkaConfig, topic: str, events: Sequence, key: Callable[[object], int],
                   record_name: str, speedup: float | None = None, progress: bool = True,
                   codec: AvroCodec | None = None, producer=None,
                   on_send: Callable[[object, float], None] | None = None) -> PublishResult:
    """Send `events` (already in event-time order) to `topic`; block until all are acknowledged.

    speedup: replay event time as wall time divided by this factor (None = as fast as possible).
    on_send(event, wall_time): called right after each send (the benchmark stamps freshness with it).
    """
    codec = codec or AvroCodec()
    own = producer is None
    producer = producer or make_producer(config)
    full_topic = config.topic(topic)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(events), desc=f"publish {full_topic}", unit="ev", mininterval=0.5)
    futures = []
    start = time.perf_counter()
    t0 = events[0].event_time if events else 0
    try:
        for i, ev in enumerate(events):
            if speedup:
                due = start + (ev.event_time - t0) / speedup
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            value = codec.encode(ev.to_record(), record_name)
            futures.append(producer.send(full_topic, key=str(key(ev)).encode(), value=value))
            if on_send is not None:
                on_send(ev, time.time())
            if bar is not None and (i & 1023) == 1023:
                bar.update(1024)
        producer.flush()
        failed = [f for f in futures if not f.succeeded()]
        if bar is not None:
            bar.update(len(events) - bar.n)
            bar.close()
        if failed:
            exc = failed[0].exception if failed[0].is_done else "not acknowledged after flush"
            raise PublishError(f"{len(failed)} of {len(futures)} records to {full_topic} were not acknowledged "
                               f"(first error: {exc}); nothing after them can be assumed written")
    finally:
        if own:
            producer.close(timeout=10)
    return PublishResult(full_topic, len(futures), time.perf_counter() - start)


def item_events(data_dir: str | Path, limit: int | None = None) -> list[ItemEvent]:
    """Item upserts stamped at created_at (60 s before the first rating), in event-time order."""
    from streams.movielens import load_movielens

    ds = load_movielens(data_dir)
    evs = sorted((ItemEvent.from_item(it) for it in ds.items.values()), key=lambda e: (e.event_time, e.item_id))
    return evs[:limit] if limit else evs


def interaction_events(data_dir: str | Path, limit: int | None = None) -> list[InteractionEvent]:
    from streams.movielens import load_movielens

    ds = load_movielens(data_dir)
    its = ds.interactions[:limit] if limit else ds.interactions
    return [InteractionEvent.from_interaction(i) for i in its]


def events_from_file(path: str | Path, kind: str) -> list:
    """JSON lines of event records (the Avro field names), sorted by event_time."""
    cls = ItemEvent if kind == ITEMS else InteractionEvent
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if kind == ITEMS:
                    rec = {"categories": [], "op": "upsert", **rec}
                out.append(cls.from_record(rec))
            except (ValueError, KeyError) as exc:
                raise PublishError(f"{path}:{n}: not a valid {cls.__name__} record: {exc}") from exc
    out.sort(key=lambda e: e.event_time)
    return out


def publish_kind(config: KafkaConfig, kind: str, events: Sequence, **kw) -> PublishResult:
    if kind == ITEMS:
        return publish_events(config, ITEMS, events, lambda e: e.item_id, "ItemEvent", **kw)
    if kind == INTERACTIONS:
        return publish_events(config, INTERACTIONS, events, lambda e: e.user_id, "InteractionEvent", **kw)
    raise ValueError(f"unknown kind {kind!r}: items | interactions")


def publish_raw(config: KafkaConfig, topic: str, pairs: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Send raw (key, value) bytes — for bad-input tests and replays of dead letters."""
    return _send_raw(config, topic, pairs)[1]


def publish_raw_through(config: KafkaConfig, topic: str, pairs: Iterable[tuple[bytes | None, bytes]]) -> dict[int, int]:
    """`publish_raw`, returning per partition the offset after the last record acknowledged there:
    a reader that has consumed that far has every one of them (the rotation backfill's mark)."""
    return _send_raw(config, topic, pairs)[0]


def _send_raw(config: KafkaConfig, topic: str, pairs) -> tuple[dict[int, int], int]:
    producer = make_producer(config)
    try:
        futs = [producer.send(config.topic(topic), key=k, value=v) for k, v in pairs]
        producer.flush()
        bad = [f for f in futs if not f.succeeded()]
        if bad:
            raise PublishError(f"{len(bad)} of {len(futs)} raw records to {topic} were not acknowledged")
        through: dict[int, int] = {}
        for f in futs:
            md = f.value  # RecordMetadata of an acknowledged send
            through[md.partition] = max(through.get(md.partition, 0), md.offset + 1)
        return through, len(futs)
    finally:
        producer.close(timeout=10)
