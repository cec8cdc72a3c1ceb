"""The model versions `trm serve` answers with: watch the published directory, load off the request path.

The trainer publishes versions as `models/v<step>/` plus a `LATEST` pointer (trainer.checkpoint.
ModelPublisher: a version is copied under a temporary name and renamed, then the pointer moves).
A `ModelRegistry` reads the pointer; when it names another version it loads that version with
trainer.evaluate.load_models, which verifies every file against the sha256 manifest first.

Why a bundle: a request must see one consistent (version, model, featurizer); the swap is a
single reference assignment of a frozen `ModelBundle`, and a request takes the reference once at
its start. A request in flight finishes on the version it started with, and its response names it.

Failure behaviour: a version that does not verify or load (partial, tampered, without the served
model) is refused: a warning is logged, `on_refused` is told (the errors metric counts it), and the
old bundle keeps serving. A refused version is not retried until its directory changes (file
names, sizes, mtimes), so a tampered version costs one warning, not one per poll, and a version
that was still being written by a non-atomic copier is loaded once it is complete. Before any
version loads, `current` is None and `reason` says why (no pointer yet, or the refusal).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import CheckpointError, read_pointer
from ..evaluate import load_models
from ..featurizer import Featurizer

log = logging.getLogger(__name__)
NGRAM_MODELS = ("two_gram", "prefix_ngram")  # the models that read tokenizer.ngrams inputs


@dataclass(frozen=True)
class ModelBundle:
    """Everything one request scores with. Never mutated after it is built (the swap replaces it whole)."""

    version: str  # the version directory's name, e.g. "v40"
    path: Path
    model_name: str
    model: torch.nn.Module  # eval mode, per-user weights as the version holds them
    featurizer: Featurizer
    tokenizer_version: str | None
    step: int
    loaded_at: float  # epoch s

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """{name: model}, the shape trainer.evaluate.score takes."""
        return {self.model_name: self.model}


def load_bundle(path: str | Path, model_name: str) -> ModelBundle:
    """Verify and load the version at `path`; CheckpointError if it lacks `model_name`."""
    path = Path(path)
    models, cfg, info = load_models(path)  # verify(): every file against the manifest
    if model_name not in models:
        raise CheckpointError(f"{path} holds models {sorted(models)}, not {model_name!r}")
    featurizer = Featurizer.for_config(cfg, info["tokenizer_version"], ngrams=model_name in NGRAM_MODELS)
    return ModelBundle(path.name, path, model_name, models[model_name], featurizer, info["tokenizer_version"],
                       int(info["step"]), time.time())


def _stamp(path: Path) -> tuple:
    """What a version directory holds now (names, sizes, mtimes): a refused version is retried when it changes."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()))
    except OSError:  # gone, or not a directory
        return ()


class ModelRegistry:
    """The current `ModelBundle` of `models_dir`, advanced by `poll()` (called from a background thread)."""

    def __init__(self, models_dir: str | Path, model_name: str = "trm",
                 on_swap: Callable[[ModelBundle], None] | None = None,
                 on_refused: Callable[[str, Exception], None] | None = None):
        self.root, self.model_name = Path(models_dir), model_name
        self.on_swap, self.on_refused = on_swap, on_refused
        self._bundle: ModelBundle | None = None
        self._refused: dict[str, tuple] = {}  # version name -> directory stamp when refused
        self.last_refused: tuple[str, str] | None = None  # (version, why)
        self.reason = f"no version loaded from {self.root} yet"

    @property
    def current(self) -> ModelBundle | None:
        return self._bundle  # one read of one reference: the caller keeps this bundle for its whole request

    def poll(self) -> bool:
        """Load the version LATEST names if it is new; True when the bundle was swapped."""
        target = read_pointer(self.root)
        cur = self._bundle
        if target is None:
            if cur is None:
                self.reason = f"no version published in {self.root} yet (no LATEST pointer)"
            return False
        if cur is not None and target.name == cur.version:
            return False
        stamp = _stamp(target)
        if self._refused.get(target.name) == stamp:
            return False
        try:
            bundle = load_bundle(target, self.model_name)
        except Exception as exc:  # noqa: BLE001 - any failure to load refuses the version, never the server
            self._refused[target.name] = stamp
            why = f"{type(exc).__name__}: {exc}"
            self.last_refused = (target.name, why)
            keep = f"keeping {cur.version}" if cur is not None else "no version serving"
            log.warning("refused model version %s (%s); %s", target.name, why, keep)
            if cur is None:
                self.reason = f"version {target.name} refused: {why}"
            if self.on_refused is not None:
                self.on_refused(target.name, exc)
            return False
        self._refused.pop(target.name, None)
        self._bundle = bundle  # the swap: one atomic reference assignment
        log.info("serving model version %s (step %d, %s)", bundle.version, bundle.step, bundle.model_name)
        if self.on_swap is not None:
            self.on_swap(bundle)
        return True


class Poller:
    """A daemon thread running `tasks` now and then every `interval_s`, until `stop()`.

    A task that raises is logged and the loop goes on: a poll never takes the server down."""

    def __init__(self, interval_s: float, tasks: Sequence[Callable[[], object]], name: str = "trm-serve-poller"):
        self.interval_s, self.tasks = interval_s, list(tasks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            for task in self.tasks:
                try:
                    task()
                except Exception:  # noqa: BLE001
                    log.exception("serving poll task %r failed", task)
            self._stop.wait(self.interval_s)
