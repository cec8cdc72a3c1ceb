"""Item gen-tokens known to the interaction agent, read from the `item_tokens` topic.

Every worker reads all partitions of `item_tokens` from the beginning (no consumer group), so
any worker can turn any interaction into history tokens, whichever worker tokenized the item.
`wake` is set when new tokens arrive so parked interactions retry at once. `rewind()` re-reads
the topic from the beginning: after a broker lost its log (memory storage restarted) the new
`item_tokens` log starts again at offset 0, below where this consumer stood.
"""
from __future__ import annotations

import asyncio
import logging

from streams.kafka_config import KafkaConfig

from .contract.codec import AvroCodec, DecodeError
from .contract.topics import ITEM_TOKENS

log = logging.getLogger(__name__)


class TokenCache:
    def __init__(self, config: KafkaConfig, topic: str = ITEM_TOKENS):
        self.config = config
        self.topic = config.topic(topic)
        self.gen: dict[int, list[int]] = {}
        self.wake = asyncio.Event()
        self.codec = AvroCodec()
        self.received = 0
        self._stopping = asyncio.Event()
        self._rewind = asyncio.Event()

    def rewind(self) -> None:
        self._rewind.set()

    def get(self, item_id: int) -> list[int] | None:
        return self.gen.get(item_id)

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                    **self.config.aiokafka_kwargs())
        await consumer.start()
        try:
            parts = None
            while parts is None:
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    # topics are created up front (create_topics); a missing one means it was not
                    await asyncio.sleep(0.2)
                    # aiokafka has no public refresh (`topics()` fills a separate copy, and the
                    # background refresh waits metadata_max_age_ms, 5 min): force the client's own
                    await consumer._client.force_metadata_update()
                    parts = None
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not self._stopping.is_set():
                if self._rewind.is_set():
                    self._rewind.clear()
                    log.warning("re-reading %s from the beginning (its log was replaced)", self.topic)
                    await consumer.seek_to_beginning(*tps)
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                new = 0
                for msgs in batches.values():
                    for m in msgs:
                        try:
                            rec = self.codec.decode(m.value, expect="ItemTokensEvent")
                        except DecodeError as exc:  # our own output; a bad one is a bug worth a log line
                            log.error("undecodable item_tokens record at %s:%s: %s", m.partition, m.offset, exc)
                            continue
                        self.gen[rec["item_id"]] = list(rec["gen_tokens"])
                        new += 1
                if new:
                    self.received += new
                    self.wake.set()
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self._stopping.set()
