"""The recorded tokenizer rotation: which artifact tokenizes which event times (`trm tokenizer rotate`).

A rotation is one JSON record, `<feast repo>/rotation.json`: every worker and the backfill
already point at the Feast repo, so it is the one place they all read. Where each process has
its own copy of the repo (the image's, as in deploy/k8s and docker-compose), `TRM_ROTATION_FILE`
names a file on a volume they all mount instead (there: the artifacts volume, beside the
artifacts the record names). It names the artifact in
use (`from`), the next one (`to`) and the rotation time `at` (epoch seconds, event time).

Why event time and not processing order: a token row is then a pure function of (text, event
time, record), like everything else the stream writes. A replay, a late event or a worker that
restarts mid-rotation writes the same tokens, and the point-in-time answers for times before `at`
never change: an event before `at` is tokenized by `from`, one at or after it by `to`, whenever
it is processed.

The rotation in order (docs/rotation.md):
  1. `trm tokenizer refit` writes the new artifact B (A's ids kept where their clusters persist).
  2. `trm tokenizer rotate --repo R --artifact B --at T` writes this record. Workers re-read it
     when the file changes: item events at or after T get B's tokens; user rows at or after T
     wait (parked) until step 3 has put B's tokens of every item in place.
  3. `trm tokenizer backfill` re-tokenizes every item with B, stamped at T, and rewrites each
     user's history tokens at T; then it marks the record `backfilled`, and the parked
     interactions are applied with B's tokens.
  4. `trm train --artifact B` migrates its checkpoint (trainer/migrate.py).

One record is kept: a later rotation replaces it. A late event older than the previous
rotation's time would get the current `from` tokens; the stream's allowed lateness (a week)
makes rotations further apart than that safe.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import StreamsError

ROTATION_FILE = "rotation.json"
ROTATION_FILE_ENV = "TRM_ROTATION_FILE"  # where the record lives when not in the repo (a shared volume)


class RotationError(StreamsError, ValueError):
    """A rotation record that cannot be used (unreadable, or not the rotation asked for)."""


@dataclass(frozen=True)
class Rotation:
    from_version: str
    from_artifact: str
    to_version: str
    to_artifact: str
    at: int  # epoch seconds (event time): events at or after it belong to `to`
    backfilled_at: float | None = None  # wall clock when the backfill finished; None: not yet
    backfill: dict | None = None  # the backfill's report (rows written)
    # item_tokens partition -> the offset after the backfill's last record there (JSON keys are
    # strings). A worker's token cache must have read that far before a parked event at or after
    # `at` is applied: the record is marked before the worker's own consumer has fetched the
    # tokens, and a history row stamped `to` would otherwise keep `from`'s tokens for some items
    tokens_through: dict[str, int] | None = None

    def tokens_read(self, position: Callable[[int], int]) -> bool:
        """Whether a cache at `position(partition)` has read every item_tokens record the backfill sent."""
        return all(position(int(p)) >= o for p, o in (self.tokens_through or {}).items())

    def version_at(self, t: int) -> str:
        return self.to_version if t >= self.at else self.from_version

    def artifact_at(self, t: int) -> str:
        return self.to_artifact if t >= self.at else self.from_artifact

    @property
    def backfilled(self) -> bool:
        return self.backfilled_at is not None

    def waits(self, t: int) -> bool:
        """A user row at `t` waits for the backfill: only then does every item have `to`'s tokens."""
        return t >= self.at and not self.backfilled


def rotation_path(repo: str | Path) -> Path:
    """`$TRM_ROTATION_FILE` when set (every process of a deployment must see the same record), else
    `<repo>/rotation.json`."""
    shared = os.environ.get(ROTATION_FILE_ENV)
    return Path(shared) if shared else Path(repo) / ROTATION_FILE


def read_rotation(repo: str | Path) -> Rotation | None:
    """The repo's rotation record, or None when there is none."""
    path = rotation_path(repo)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RotationError(f"{path} is not valid JSON ({exc}): rewrite it with `trm tokenizer rotate`") from exc
    try:
        return Rotation(**data)
    except TypeError as exc:
        raise RotationError(f"{path} is not a rotation record ({exc}): rewrite it with `trm tokenizer rotate`") from exc


def write_rotation(repo: str | Path, rotation: Rotation) -> Path:
    """Atomically (temp file + rename): a worker re-reading it never sees half a record."""
    path = rotation_path(repo)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rotation), indent=1))
    os.replace(tmp, path)
    return path


class RotationWatch:
    """The repo's current record, re-read when the file changes (one stat per call): a running
    worker follows `rotate` and `backfill` without a restart."""

    def __init__(self, repo: str | Path):
        self.repo = Path(repo)
        self._stamp: tuple | None = None
        self._rotation: Rotation | None = None

    def current(self) -> Rotation | None:
        try:
            st = rotation_path(self.repo).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._rotation = read_rotation(self.repo) if stamp is not None else None
            self._stamp = stamp
        return self._rotation
