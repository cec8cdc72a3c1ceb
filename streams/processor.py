"""What the batch loop asks of a processor (`Processor`), what a batch gives back (`BatchResult`),
and the no-op defaults (`BaseProcessor`) that a processor without per-partition state uses as they
are (the item agent) and `PartitionedProcessor` (streams/partitioned.py) overrides.

The loop calls every method directly; nothing is probed. When the loop calls each one, and in
which order the batch's effects become durable: `BatchLoop._process_and_commit`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from .dlq import DeadLetter, SourceRecord


@dataclass
class BatchResult:
    dead: list[DeadLetter] = field(default_factory=list)
    outputs: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (key, value) to the output topic
    applied: int = 0
    parked: int = 0
    skipped: int = 0  # <= hwm: already applied before a restart
    duplicates: int = 0  # an interaction already applied (same user, item, event time, label): a no-op
    folded: int = 0  # item-stats: events older than the compaction cutoff, counted in the base
    hwm: dict[int, int] = field(default_factory=dict)  # partition -> last offset seen in this batch
    marks: dict[int, int] = field(default_factory=dict)  # partition -> record_mark of the record at hwm


def record_mark(key: bytes | None, value: bytes | None) -> int:
    """A record's fingerprint, CRC-32 of its key and value. Saved with the high-water mark, it tells the
    log a worker read from a new log that already grew past that offset (BatchLoop._positions): the
    record at the mark's offset differs."""
    return zlib.crc32(value or b"", zlib.crc32(key or b""))


class Processor(Protocol):
    """One agent's computation over batches of one input topic; the loop owns Kafka. Called from
    one thread at a time (the loop's processor thread, or the event loop when not threaded)."""

    # holds records back until they can be applied (`retry_parked`); only then does the loop
    # retry them on wake-ups and idle polls, and commit no further than `commit_positions` says
    parks: ClassVar[bool]

    def process(self, records: list[SourceRecord]) -> BatchResult: ...

    def retry_parked(self) -> BatchResult: ...

    def set_partition_count(self, n: int) -> None: ...

    def assign(self, partitions: list[int]) -> None: ...

    def revoke(self, partitions: list[int]) -> None: ...

    def hwm(self, partition: int) -> int: ...

    def hwm_mark(self, partition: int) -> int | None: ...

    def log_reset(self, partition: int) -> None: ...

    def save(self, hwm: dict[int, int], marks: dict[int, int] | None = None) -> None: ...

    def commit_positions(self, ends: dict[int, int]) -> dict[int, int]: ...

    def n_parked(self) -> int: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class BaseProcessor:
    """No-op defaults: no saved state (high-water mark -1, nothing to save, reset or close), no
    parking (commit the batch's ends). Subclasses implement `process`."""

    parks: ClassVar[bool] = False

    def process(self, records: list[SourceRecord]) -> BatchResult:
        raise NotImplementedError

    def retry_parked(self) -> BatchResult:
        """Never called while `parks` is False."""
        return BatchResult()

    def set_partition_count(self, n: int) -> None:
        """Partitions of the input topic, told on every assignment."""

    def assign(self, partitions: list[int]) -> None:
        pass

    def revoke(self, partitions: list[int]) -> None:
        pass

    def hwm(self, partition: int) -> int:
        """The last offset whose effects are saved; -1: none (read from the committed offset)."""
        return -1

    def hwm_mark(self, partition: int) -> int | None:
        """`record_mark` of the record at the saved high-water mark; None: not known."""
        return None

    def log_reset(self, partition: int) -> None:
        """The partition's log was replaced by a new one: its saved high-water mark is void."""

    def save(self, hwm: dict[int, int], marks: dict[int, int] | None = None) -> None:
        pass

    def commit_positions(self, ends: dict[int, int]) -> dict[int, int]:
        """Per partition, the offset to commit after a batch whose records end at `ends`."""
        return ends

    def n_parked(self) -> int:
        return 0

    def reset(self) -> None:
        """Forget unsaved in-memory state and reopen what was last saved (a retry's step 2)."""

    def close(self) -> None:
        """The loop ends: release what the processor holds."""
