"""A directory of files sealed by a sha256 manifest: hashing, fsync, sealing and verification.

Both durable directories of the project use the same layout: data files side by side and a
`manifest.json` holding `{"files": {name: sha256}}` (plus whatever top-level fields the caller
adds, e.g. the tokenizer's format/format_version/version). The manifest is written *last*, so a
directory whose writer died midway never verifies; a reader checks every listed file against its
digest before trusting any of them.

Users: the tokenizer artifact (tokenizer/artifact.py), the trainer's checkpoints and published
model versions (trainer/checkpoint.py), and, for the fsync helpers only, offline compaction
(streams/compaction.py).

Why it lives in `tokenizer/`: the tokenizer is the bottom layer of the project: it imports
nothing of `streams`, `trainer` or `trm`, while both of those may import it. Putting the helper
here lets every package share one implementation without an import cycle; this module imports
only the standard library, so importing it is cheap and pulls in nothing else of the tokenizer.

Errors: `ManifestError` and its subclasses carry *what* failed (the path, the names) but are not
the callers' public errors. Each caller catches them and raises its own type with its own
wording (`ArtifactError` "…fails its checksum…", `CheckpointError` "…not a complete
checkpoint"), so the messages users and tests see belong to the artifact or checkpoint they
concern. `ManifestError` is deliberately not a `TokenizerError`: a checkpoint failing its
manifest is not a tokenizer failure, and none escapes the tokenizer's own API untranslated.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ManifestError(Exception):
    """A directory does not match its manifest; `path` is the offending file (or the manifest)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class ManifestMissing(ManifestError):
    """There is no manifest: the directory was never sealed, or its writer died before sealing it."""


class ManifestUnreadable(ManifestError):
    """The manifest is not a JSON object (truncated or tampered); `detail` is the parser's complaint."""

    def __init__(self, message: str, path: Path, detail: str) -> None:
        super().__init__(message, path)
        self.detail = detail


class NotListed(ManifestError):
    """Names the caller requires are absent from the manifest; `names` in the caller's order."""

    def __init__(self, message: str, path: Path, names: list[str]) -> None:
        super().__init__(message, path)
        self.names = names


class FilesDiffer(ManifestError):
    """The files present are not exactly those listed; `names` (sorted) are on one side only."""

    def __init__(self, message: str, path: Path, names: list[str]) -> None:
        super().__init__(message, path)
        self.names = names


class FileMissing(ManifestError):
    """A listed file is not in the directory; `name` is its manifest entry."""

    def __init__(self, message: str, path: Path, name: str) -> None:
        super().__init__(message, path)
        self.name = name


class DigestMismatch(ManifestError):
    """A file's sha256 differs from the manifest's: modified or corrupted; `name` is its entry."""

    def __init__(self, message: str, path: Path, name: str) -> None:
        super().__init__(message, path)
        self.name = name


# --- digests and durability ---

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Streamed, so a large checkpoint file is never held in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path, *, best_effort: bool = False) -> None:
    """Make the directory's entries (creations, renames, deletions) durable.

    `best_effort=True` ignores filesystems that refuse to open or fsync a directory (some network
    and FUSE mounts): for callers where the fsync only narrows a crash window (compaction) rather
    than being what makes a write complete (a checkpoint's rename).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


# --- writing ---

def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    # sorted keys and ASCII: the same logical manifest is always the same bytes
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def remove_manifest(directory: str | Path) -> None:
    """Unseal before rewriting files in place: until the new manifest is written, nothing verifies."""
    (Path(directory) / MANIFEST).unlink(missing_ok=True)


def write_manifest(directory: str | Path, digests: Mapping[str, str], *,
                   extra: Mapping[str, Any] | None = None, fsync: bool = True) -> dict[str, Any]:
    """Write `manifest.json` listing `digests`; call it after every file it lists is written.

    `extra` adds top-level fields next to "files". With `fsync` (the default) the manifest and the
    directory are fsynced, so once this returns the seal survives a power cut; the caller fsyncs
    the data files first (or uses `seal`). Returns the manifest written.
    """
    d = Path(directory)
    manifest: dict[str, Any] = {**(extra or {}), "files": dict(sorted(digests.items()))}
    (d / MANIFEST).write_bytes(_manifest_bytes(manifest))
    if fsync:
        fsync_file(d / MANIFEST)
        fsync_dir(d)
    return manifest


def seal(directory: str | Path, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsync every regular file in `directory`, then write and fsync the manifest of their digests."""
    d = Path(directory)
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name != MANIFEST)
    for p in files:
        fsync_file(p)
    return write_manifest(d, {p.name: sha256_file(p) for p in files}, extra=extra)


# --- reading and verifying ---

def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest; ManifestMissing / ManifestUnreadable when there is none to trust."""
    mpath = Path(directory) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ManifestMissing(f"{mpath} is missing", mpath) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestUnreadable(f"{mpath} is not valid JSON: {exc}", mpath, str(exc)) from exc
    if not isinstance(manifest, dict):
        detail = f"expected a JSON object, got {type(manifest).__name__}"
        raise ManifestUnreadable(f"{mpath} is not valid JSON: {detail}", mpath, detail)
    return manifest


def listed_files(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The manifest's {name: sha256}; empty when it lists nothing."""
    return dict(manifest.get("files") or {})


def _require_listed(directory: Path, listed: Mapping[str, str], names: Iterable[str]) -> None:
    missing = [n for n in names if n not in listed]
    if missing:
        raise NotListed(f"{directory / MANIFEST} does not list {missing}", directory / MANIFEST, missing)


def _digest_mismatch(directory: Path, name: str) -> DigestMismatch:
    return DigestMismatch(f"{directory / name}: sha256 differs from {MANIFEST}", directory / name, name)


def read_verified(directory: str | Path, manifest: Mapping[str, Any], names: Iterable[str]) -> dict[str, bytes]:
    """Read `names` (each required to be listed) and check each against its digest, in order.

    Returns the bytes that were checked, so the caller parses exactly what it verified (no second
    read that could see a different file). For small files; `verify` streams large ones.
    """
    d = Path(directory)
    names = list(names)
    listed = listed_files(manifest)
    _require_listed(d, listed, names)
    blobs: dict[str, bytes] = {}
    for name in names:
        p = d / name
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise FileMissing(f"{p} is missing", p, name) from None
        if sha256_bytes(data) != listed[name]:
            raise _digest_mismatch(d, name)
        blobs[name] = data
    return blobs


def verify(directory: str | Path, *, exact: bool = False, required: Iterable[str] = ()) -> dict[str, Any]:
    """Check `directory` against its manifest and return the manifest.

    Every listed file must be present with its digest. `required`: names the manifest must list.
    `exact`: the regular files present (besides the manifest) must be exactly those listed, so an
    extra file is refused too (FilesDiffer, raised before any digest is computed).
    """
    d = Path(directory)
    manifest = read_manifest(d)
    listed = listed_files(manifest)
    _require_listed(d, listed, required)
    if exact:
        present = {p.name for p in d.iterdir() if p.is_file()} - {MANIFEST}
        if present != set(listed):
            names = sorted(present ^ set(listed))
            raise FilesDiffer(f"{d}: files {names} differ from {MANIFEST}", d, names)
    for name, digest in listed.items():
        try:
            actual = sha256_file(d / name)
        except FileNotFoundError:
            raise FileMissing(f"{d / name} is missing", d / name, name) from None
        if actual != digest:
            raise _digest_mismatch(d, name)
    return manifest
