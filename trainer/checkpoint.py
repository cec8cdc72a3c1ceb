"""Atomic, verifiable checkpoints and published model versions.

A checkpoint is a directory written under a temporary name, fsynced, then renamed: a reader sees
a complete checkpoint or none. It holds every model (safetensors), every optimizer (torch.save of
tensors only, loaded with weights_only=True), the torch RNG state, the consumed offsets, the
tokenizer version and the step, plus a manifest of sha256 digests checked on load.
`LATEST` (a one-line pointer replaced with os.replace) names the newest complete one.

Hashing, fsync and the manifest itself are tokenizer/manifest.py's (shared with the tokenizer
artifact); this module keeps the checkpoint's layout, its failpoints and its error messages.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from streams.failpoints import failpoint
from tokenizer import manifest as mf
from tokenizer.manifest import MANIFEST, fsync_dir, fsync_file
from trainer.errors import TrainerError

STATE, POINTER = "state.json", "LATEST"
ONLINE_PARTS = ("online_linear.",)  # buffers learned per event that a checkpoint written before them lacks
log = logging.getLogger(__name__)


class CheckpointError(TrainerError, RuntimeError):
    """A checkpoint is missing, incomplete, tampered with, or does not fit the models."""


@dataclass
class TrainState:
    step: int = 0
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset to read
    tokenizer_version: str | None = None
    events_seen: int = 0
    extra: dict = field(default_factory=dict)  # model config, model names, ...


def write_pointer(root: Path, target: str) -> None:
    """Atomically point root/LATEST at `target` (a directory name inside root)."""
    tmp = root / f".{POINTER}.{os.getpid()}.tmp"
    tmp.write_text(target + "\n")
    fsync_file(tmp)
    os.replace(tmp, root / POINTER)
    fsync_dir(root)


def remove_stale_temps(root: str | Path) -> list[str]:
    """Delete what a killed writer left in `root`: `.tmp-*` directories (a checkpoint or version being
    written) and `.LATEST.*.tmp` pointer files. Call only where one process owns `root` (at start-up);
    returns the names removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
        elif p.name.startswith(f".{POINTER}.") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def read_pointer(root: str | Path) -> Path | None:
    """The directory root/LATEST names, or None if there is no pointer yet."""
    root = Path(root)
    try:
        name = (root / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    return root / name


def verify(path: str | Path) -> dict:
    """Check the manifest against the files; returns the manifest or raises CheckpointError.

    Exact: a file the manifest does not list is refused too, so nothing rides along unverified.
    """
    path = Path(path)
    try:
        return mf.verify(path, exact=True)
    except mf.ManifestMissing:
        raise CheckpointError(f"{path}: no {MANIFEST}; not a complete checkpoint") from None
    except mf.ManifestUnreadable as exc:
        raise CheckpointError(f"{path}/{MANIFEST} is not valid JSON ({exc.detail}): tampered or truncated") from None
    except mf.FilesDiffer as exc:
        raise CheckpointError(f"{path}: files {exc.names} differ from the manifest") from None
    except mf.DigestMismatch as exc:
        raise CheckpointError(f"{path}/{exc.name}: sha256 does not match the manifest; "
                              "the file was modified") from None
    except mf.ManifestError as exc:  # e.g. a listed file deleted while it was being checked
        raise CheckpointError(f"{path}: {exc}") from None


def rng_state() -> dict[str, torch.Tensor]:
    """The generators a resumed run needs to continue as it would have: the CPU's, and every GPU's where
    one is used (bit-identically on the CPU; CUDA's kernels for embedding backward are not deterministic)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(saved: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(saved["torch"])
    gpus = [saved[k] for k in sorted(saved) if k.startswith("cuda")]
    if gpus and torch.cuda.is_available() and len(gpus) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(gpus)


def save_checkpoint(root: str | Path, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], state: TrainState, keep: int = 3) -> Path:
    """Write root/ckpt-<step> atomically, point root/LATEST at it, drop all but the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    try:
        for name, model in models.items():
            save_model(model, str(tmp / f"model.{name}.safetensors"))
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"optim.{name}.pt")
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        failpoint("trainer.mid_checkpoint")  # weights written, state and manifest not yet
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
        mf.seal(tmp)  # fsync every file, then write the manifest of their digests last
        final = root / f"ckpt-{state.step:09d}"
        if final.exists():  # a replayed step after a crash: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        failpoint("trainer.before_pointer")  # complete checkpoint in place, LATEST still names the previous one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_pointer(root, final.name)
    for old in sorted(root.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: str | Path) -> TrainState:
    verify(path)
    return TrainState(**json.loads((Path(path) / STATE).read_text()))


def load_checkpoint(path: str | Path, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    restore_rng: bool = True) -> TrainState:
    """Verify, then load models (strict), optimizers and RNG in place; returns the train state."""
    path = Path(path)
    verify(path)
    for name, model in models.items():
        f = path / f"model.{name}.safetensors"
        if not f.exists():
            raise CheckpointError(f"{path} has no model {name!r}")
        missing, unexpected = load_model(model, str(f), strict=False)
        # a component learned online that the checkpoint predates starts empty (it relearns from the
        # stream, as in a new trainer); anything else missing means another model
        fresh = [k for k in missing if k.startswith(ONLINE_PARTS)]
        if fresh:
            log.warning("%s predates %s: it starts empty", f.name, sorted({k.split(".")[0] for k in fresh}))
            missing = [k for k in missing if not k.startswith(ONLINE_PARTS)]
        if missing or unexpected:
            raise CheckpointError(f"{f}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, opt in (optimizers or {}).items():
        f = path / f"optim.{name}.pt"
        if not f.exists():
            raise CheckpointError(f"{path} has no optimizer state for {name!r}")
        # moments load on the CPU, then move to each parameter's device (a GPU checkpoint resumes on a CPU)
        opt.load_state_dict(torch.load(f, weights_only=True, map_location="cpu"))
    if restore_rng:
        set_rng_state(load_file(str(path / "rng.safetensors")))
    return TrainState(**json.loads((path / STATE).read_text()))


def load_latest(root: str | Path, models, optimizers=None, restore_rng: bool = True) -> TrainState | None:
    """Resume from root/LATEST; None when no checkpoint was ever written."""
    path = read_pointer(root)
    if path is None:
        return None
    return load_checkpoint(path, models, optimizers, restore_rng)


class ModelPublisher:
    """Every `every` steps, copy the checkpoint to models/v<step>/ and move models/LATEST to it.

    The copy is made under a temporary name and renamed, and the pointer is replaced only after
    the rename, so a reader following LATEST never sees a partial version.
    """

    def __init__(self, models_dir: str | Path, every: int, keep: int = 5):
        self.root, self.every, self.keep = Path(models_dir), every, keep
        remove_stale_temps(self.root)  # a version copy cut short by a crash
        latest = read_pointer(self.root)  # a restarted trainer continues the version sequence
        self.last_published = int(latest.name[1:]) if latest is not None else 0

    def maybe_publish(self, checkpoint: Path, step: int) -> Path | None:
        if self.every <= 0 or step < self.last_published + self.every:
            return None
        return self.publish(checkpoint, step)

    def publish(self, checkpoint: Path, step: int) -> Path:
        verify(checkpoint)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"v{step}"
        if not final.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{step}-", dir=self.root))
            for f in checkpoint.iterdir():
                if f.name.startswith("optim."):  # readers need weights, not optimizer moments
                    continue
                shutil.copy2(f, tmp / f.name)
            failpoint("trainer.mid_publish")  # version copied under its temporary name, not renamed
            # the checkpoint's digests, less the optimizers': the copies are checked against the
            # originals' hashes, not re-hashed (a bad copy then fails verify instead of being sealed)
            manifest = json.loads((tmp / MANIFEST).read_text())
            files = {k: v for k, v in manifest["files"].items() if not k.startswith("optim.")}
            for f in tmp.iterdir():
                if f.name != MANIFEST:
                    fsync_file(f)
            mf.write_manifest(tmp, files, extra={k: v for k, v in manifest.items() if k != "files"})
            os.rename(tmp, final)
            fsync_dir(self.root)
        write_pointer(self.root, final.name)
        self.last_published = step
        versions = sorted(self.root.glob("v*"), key=lambda p: int(p.name[1:]))
        for old in versions[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
