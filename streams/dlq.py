"""Dead letters: the original key and bytes of an event the worker could not use, plus why.

A dead letter goes to `<topic>.dlq` with headers `dlq.reason`, `dlq.topic`, `dlq.partition`,
`dlq.offset` (docs/contracts.md), so the event can be inspected and replayed byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass

from .contract.topics import dlq_of


@dataclass(frozen=True)
class SourceRecord:
    """Where an event came from, and its original bytes."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    record: SourceRecord
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [("dlq.reason", self.reason.encode()), ("dlq.topic", self.record.topic.encode()),
                ("dlq.partition", str(self.record.partition).encode()),
                ("dlq.offset", str(self.record.offset).encode())]

    @property
    def dlq_topic(self) -> str:
        return dlq_of(self.record.topic)

    @staticmethod
    def reason_kind(reason: str) -> str:
        """A short label for counters: the part before the first ':'."""
        return reason.split(":", 1)[0]


def read_dead_letters(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    """Header list of a DLQ record -> {name: value}."""
    return {k: v.decode() for k, v in headers or []}
