"""The part every per-partition SQLite store shares (user history, item counts): one file per
input partition, opened with WAL, a `meta` table of integers, and the high-water mark `hwm` —
the last input offset whose effects are in this file.

Why a high-water mark: it is saved in the same transaction as the state (`save`), so a replay
skips offsets <= hwm instead of applying them twice, and a replay of offsets > hwm recomputes the
same values from the same saved state. When the save happens relative to the Feast write and the
offset commit: `BatchLoop._process_and_commit`.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import ClassVar

DEFAULT_ALLOWED_LATENESS_S = 7 * 86_400  # event-time seconds: a week

_OPEN = """
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);"""


class PartitionStore:
    """Subclasses name their tables in `SCHEMA`, and fill in the hooks: `_load` (in-memory state
    from the file), `_write`/`_meta_values`/`_saved` (what `save` writes) and `_on_log_reset`."""

    SCHEMA: ClassVar[str]  # CREATE ... IF NOT EXISTS statements, after `meta`

    def __init__(self, path: str | Path, allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S):
        self.path = Path(path)
        self.allowed_lateness_s = int(allowed_lateness_s)
        self.bucket_s = max(1, self.allowed_lateness_s // 16)  # compaction granularity (event time)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript(_OPEN + self.SCHEMA)
        self._migrate()
        self.db.commit()
        meta = dict(self.db.execute("SELECT k, v FROM meta"))
        self.hwm: int = meta.get("hwm", -1)
        # processor.record_mark of the record at hwm, trusted only where saved for that very offset: code
        # older than the mark (a rollback) advances hwm and leaves the mark behind, fingerprinting another
        # record; a mark saved without its offset (the code before it was kept) may be such a one, so it
        # is not trusted either (until the next save, the end-offset check alone, as for older files)
        at = meta.get("hwm_mark_at")
        self.hwm_mark: int | None = meta.get("hwm_mark") if at is not None and at == self.hwm else None
        self._load(meta)

    # -- hooks --
    def _migrate(self) -> None:
        """Bring a file written by older code to today's schema (before the commit of `SCHEMA`)."""

    def _load(self, meta: dict[str, int]) -> None:
        raise NotImplementedError

    def _write(self, db: sqlite3.Connection) -> None:
        """The changes since the last save, inside its transaction."""
        raise NotImplementedError

    def _meta_values(self) -> list[tuple[str, int]]:
        return []

    def _saved(self) -> None:
        """The transaction committed: forget the changes."""

    def _on_log_reset(self, db: sqlite3.Connection) -> None:
        """What else changes, in the same transaction, when the input log is replaced."""

    # -- shared --
    def save(self, hwm: int | None = None, mark: int | None = None) -> None:
        """One transaction: the changes, the meta values, the high-water mark (it never goes down) and
        the fingerprint of its record (`mark`; None: not known, as in files older code wrote)."""
        db = self.db
        with db:
            self._write(db)
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", self._meta_values())
            if hwm is not None and hwm > self.hwm:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', ?)", (hwm,))
                if mark is None:
                    db.execute("DELETE FROM meta WHERE k IN ('hwm_mark', 'hwm_mark_at')")
                else:
                    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("hwm_mark", mark), ("hwm_mark_at", hwm)])
                self.hwm, self.hwm_mark = hwm, mark
        self._saved()

    def reset_log(self) -> None:
        """The input log was replaced by a new one (a memory broker restarted; see
        BatchLoop._positions): its offsets restart at 0, so the high-water mark is void."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', -1)")
            self.db.execute("DELETE FROM meta WHERE k IN ('hwm_mark', 'hwm_mark_at')")
            self._on_log_reset(self.db)
        self.hwm, self.hwm_mark = -1, None

    def close(self) -> None:
        self.db.close()
