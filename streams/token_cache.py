"""Item gen-tokens known to the interaction agent, read from the `item_tokens` topic.

Every worker reads all partitions of `item_tokens` from the beginning (no consumer group), so
any worker can turn any interaction into history tokens, whichever worker tokenized the item.
`wake` is set when new tokens arrive so parked interactions retry at once. `rewind()` re-reads
the topic from the beginning: after a broker lost its log (memory storage restarted) the new
`item_tokens` log starts again at offset 0, below where this consumer stood.

`keep_records=True` also keeps each item's whole latest ItemTokensEvent record in `records` (the
ranking service, trainer/serving/token_cache.py, serves every item_tokens feature from it); the
workers need only the gen-tokens. `caught_up` turns True once the consumer's position has reached
every partition's high watermark as a fetch response reported it (every item tokenized before
then is in the cache). Not `end_offsets`: Tansu's ListOffsets answers the base offset of the last
record batch + 1, an undercount (streams/broker.py), which would claim caught up mid-batch. The
last record received for an item wins, as in the online stores (last write wins, the topic is
keyed by item and written in the same order as Feast); `by_version` keeps each artifact's latest
tokens of an item too, which the interaction agent reads across a rotation (streams/rotation.py),
and `position(partition)` tells it whether the backfill's tokens have all been read yet.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from streams.kafka_config import KafkaConfig

from .contract.codec import AvroCodec, DecodeError
from .contract.topics import ITEM_TOKENS

log = logging.getLogger(__name__)


class TokenCache:
    def __init__(self, config: KafkaConfig, topic: str = ITEM_TOKENS, keep_records: bool = False):
        self.config = config
        self.topic = config.topic(topic)
        self.gen: dict[int, list[int]] = {}  # item_id -> its latest gen-tokens, whichever artifact made them
        # artifact version -> item_id -> gen-tokens: across a rotation both artifacts' tokens are needed
        self.by_version: dict[str, dict[int, list[int]]] = {}
        self.latest_version: str | None = None  # of the newest record received
        self.keep_records = keep_records
        self.records: dict[int, dict] = {}  # item_id -> its latest decoded ItemTokensEvent (keep_records only)
        self.caught_up = False
        self.reading = False  # True while a consumer is assigned to the topic's partitions
        self.wake = asyncio.Event()
        self.codec = AvroCodec()
        self.received = 0
        self.positions: dict[int, int] = {}  # partition -> offset after the last record read
        self._stopping = asyncio.Event()
        self._rewind = asyncio.Event()

    def rewind(self) -> None:
        self._rewind.set()

    def get(self, item_id: int) -> list[int] | None:
        return self.gen.get(item_id)

    def position(self, partition: int) -> int:
        """The offset after the last record read from `partition` (0: none yet)."""
        return self.positions.get(partition, 0)

    def get_version(self, item_id: int, version: str) -> list[int] | None:
        """The item's gen-tokens made by artifact `version` (the interaction agent across a rotation)."""
        return self.by_version.get(version, {}).get(item_id)

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                    **self.config.aiokafka_kwargs())
        try:
            await consumer.start()  # inside the try: a failed start (broker unreachable) still closes the client
            parts = None
            while parts is None and not self._stopping.is_set():
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    # topics are created up front (create_topics); a missing one means it was not
                    await asyncio.sleep(0.2)
                    # aiokafka has no public refresh (`topics()` fills a separate copy, and the
                    # background refresh waits metadata_max_age_ms, 5 min): force the client's own
                    await consumer._client.force_metadata_update()
                    parts = None
            if parts is None:  # stopped while waiting for the topic
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self.reading = True
            while not self._stopping.is_set():
                if self._rewind.is_set():
                    self._rewind.clear()
                    log.warning("re-reading %s from the beginning (its log was replaced)", self.topic)
                    await consumer.seek_to_beginning(*tps)
                    self.positions.clear()
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                new = 0
                for msgs in batches.values():
                    for m in msgs:
                        self.positions[m.partition] = m.offset + 1
                        try:
                            rec = self.codec.decode(m.value, expect="ItemTokensEvent")
                        except DecodeError as exc:  # our own output; a bad one is a bug worth a log line
                            log.error("undecodable item_tokens record at %s:%s: %s", m.partition, m.offset, exc)
                            continue
                        gen = self.gen[rec["item_id"]] = list(rec["gen_tokens"])
                        version = self.latest_version = rec["tokenizer_version"]
                        self.by_version.setdefault(version, {})[rec["item_id"]] = gen
                        if self.keep_records:
                            self.records[rec["item_id"]] = rec
                        new += 1
                if new:
                    self.received += new
                    self.wake.set()
                if not self.caught_up:
                    self.caught_up = await self._at_log_end(consumer, tps)
        finally:
            self.reading = False
            await _stop(consumer)

    @staticmethod
    async def _at_log_end(consumer, tps) -> bool:
        """True when every partition has been fetched and its position is at its high watermark."""
        for tp in tps:
            hw = consumer.highwater(tp)  # None until a fetch response for tp arrived
            if hw is None or await consumer.position(tp) < hw:
                return False
        return True

    def stop(self) -> None:
        self._stopping.set()


async def _stop(consumer) -> None:
    """consumer.stop(), surviving aiokafka 0.14's Fetcher.close: it cancels its in-flight fetch tasks
    and then awaits them unguarded, so when a fetch was retrying (broker gone) their CancelledError
    escapes stop() before the client is closed. Not ours: swallowed unless this task is the one being
    cancelled, then the client is closed."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        log.debug("aiokafka's fetcher raised CancelledError while closing; closing its client")
        with contextlib.suppress(Exception):
            await consumer._client.close()
