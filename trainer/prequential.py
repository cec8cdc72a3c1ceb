"""The prequential (predict-then-learn) protocol: where the headline metric comes from.

Every micro-batch of labelled events is point-in-time joined (trainer.pit_join), featurized
(trainer.featurizer), then, chunk by chunk (`LearnerConfig.score_every` rows), scored by *every*
model in eval mode before *any* model trains on that chunk (`ContinuousTrainer.process`:
`Learner.predict`, then `Learner.train`). A score therefore comes
from weights that have seen neither that row nor any later one: the stream is its own test set
and needs no hold-out split (progressive validation, as in river's evaluate.progressive_val_score).

What is measured:
  * per batch and model, AUC / log-loss of those scores and the mean training-loss parts: one
    JSON line per (batch, model) in `log_path` (`prequential.jsonl`, plotted by metrics.plot_curves);
  * with `keep_predictions`, every score (`prediction_frame()`); the metrics of the events at or
    after a cutoff (the tokenizer's fit cutoff in the demo: items and interactions it never saw)
    are the headline numbers the demo reports (`summarize_after_cutoff`).

Offsets live in the checkpoint, next to the weights they produced. Kafka offsets are committed
only after the checkpoint is durable, and a restart seeks to the checkpoint's offsets, so a
crash replays at most the batch that was trained but not yet checkpointed, and skips nothing.
The same `ContinuousTrainer.process` runs under Kafka (trainer.kafka_source.follow) and over an
in-memory list of events (`run_events`, here: tests, `trm train` replay, benchmarks). With
`journal_path` every trained batch (its offsets) and every checkpoint is appended to a
JSON-lines progress journal (`trm train --journal`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .batch import batch_cut, chunk_bounds, splits_second
from .checkpoint import (CheckpointError, ModelPublisher, TrainState, load_latest, read_pointer, remove_stale_temps,
                         save_checkpoint)
from .errors import TrainerError
from .featurizer import Featurizer, FeaturizeStats
from .learner import Learner
from .metrics import auc, logloss, summarize
from .warm_start import TRAINED_UNTIL

log = logging.getLogger(__name__)
MEMORY_PARTITION = "memory:0"


@dataclass(frozen=True)
class Record:
    """A labelled interaction and where it was read from."""

    user_id: int
    item_id: int
    label: int
    event_time: int
    partition: str = MEMORY_PARTITION  # "topic:partition"
    offset: int = 0


@dataclass
class Timings:
    join_s: float = 0.0  # wall time the loop waited for joins (what a prefetched join still costs)
    join_busy_s: float = 0.0  # time the joins themselves took (in a prefetch thread or not)
    featurize_s: float = 0.0
    predict_s: float = 0.0
    train_s: float = 0.0
    checkpoint_s: float = 0.0
    peers_s: float = 0.0  # peer learners (not the product's models): inside total_s
    total_s: float = 0.0

    def add(self, **kw: float) -> None:
        for k, v in kw.items():
            setattr(self, k, getattr(self, k) + v)

    def shares(self) -> dict[str, float]:
        tot = self.total_s or 1.0
        return {k: v / tot for k, v in vars(self).items() if k != "total_s"}


def offset_runs(records: Sequence[Record]) -> dict[str, list[list[int]]]:
    """{"topic:partition": [[first, end), ...]}: the offsets of `records` as half-open runs."""
    by_part: dict[str, list[int]] = {}
    for r in records:
        by_part.setdefault(r.partition, []).append(r.offset)
    out: dict[str, list[list[int]]] = {}
    for key, offs in sorted(by_part.items()):
        runs: list[list[int]] = []
        for o in sorted(offs):
            if runs and o == runs[-1][1]:
                runs[-1][1] = o + 1
            else:
                runs.append([o, o + 1])
        out[key] = runs
    return out


def records_frame(records: Sequence[Record]) -> pd.DataFrame:
    return pd.DataFrame([(r.user_id, r.item_id, r.label, r.event_time) for r in records],
                        columns=["user_id", "item_id", "label", "event_time"])


class TrainerCrash(TrainerError, RuntimeError):
    """Raised by a test hook to simulate the process dying at a given point of a batch."""


@dataclass
class ContinuousTrainer:
    learner: Learner
    joiner: Callable[[pd.DataFrame], pd.DataFrame]  # events -> PIT-joined rows (pit_join.FeastJoiner)
    featurizer: Featurizer
    checkpoint_dir: Path
    publisher: ModelPublisher | None = None
    log_path: Path | None = None  # prequential metrics, one JSON line per (batch, model)
    journal_path: Path | None = None  # progress journal: one JSON line per trained batch and per checkpoint
    checkpoint_every: int = 1  # batches between checkpoints (offsets advance only with them)
    keep_predictions: bool = False
    # peer learners scored and trained on the same joined rows (trainer.peers.VWPeer): each scores
    # and learns event by event; reported beside the models, never checkpointed (a restarted
    # trainer starts its peers afresh)
    peers: dict = field(default_factory=dict)
    # the tokenizer artifact's lineage (a refit's id map from its parent): a checkpoint trained on the
    # parent is migrated on resume (trainer/migrate.py) instead of refused
    lineage: dict | None = None
    fail_at: Callable[[str, int], None] | None = None  # test hook: (phase, step) -> may raise TrainerCrash
    # called after each trained batch with (its seconds, {model: {"auc", "logloss", ...}}) (trainer/telemetry.py)
    on_batch: Callable[[float, dict], None] | None = None
    state: TrainState = field(default_factory=TrainState)
    timings: Timings = field(default_factory=Timings)
    fstats: FeaturizeStats = field(default_factory=FeaturizeStats)
    predictions: list[pd.DataFrame] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.state.tokenizer_version = self.featurizer.tokenizer_version
        self.state.extra.setdefault("config", self.learner.cfg.to_dict())
        self.state.extra.setdefault("models", self.learner.names)
        self._pending = 0  # batches trained since the last checkpoint
        self.checkpointed_offsets: dict[str, int] = dict(self.state.offsets)  # what Kafka may be told
        self.checkpointed_at: float | None = None  # wall clock of the last durable checkpoint of this run
        self.consumer = None  # the Kafka consumer while following (trainer.kafka_source.follow): its lag

    # --- restart ---------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the latest checkpoint if there is one; True if resumed. Partial writes a crash left
        behind (never named by LATEST) are deleted first."""
        gone = remove_stale_temps(self.checkpoint_dir)
        if gone:
            log.warning("removed %d partial checkpoint file(s) left by a crash: %s", len(gone), gone[:3])
        st = load_latest(self.checkpoint_dir, self.learner.models, self.learner.optimizers)
        if st is None:
            return False
        if st.extra.get("models") != self.learner.names:
            raise CheckpointError(f"checkpoint trains {st.extra.get('models')}, this trainer {self.learner.names}")
        if st.tokenizer_version != self.featurizer.tokenizer_version:
            self._migrate(st)
        self.state = st
        self.checkpointed_offsets = dict(st.offsets)
        return True

    def _migrate(self, st: TrainState) -> None:
        """Remap the loaded models' token rows from st's tokenizer to the features' (a refit of it).

        In memory only: the next checkpoint stores the migrated weights under the new version; a
        crash before it resumes from the old checkpoint and migrates again, to the same weights."""
        from .migrate import MigrationError, migrate, token_map

        cfg = self.learner.cfg
        try:
            tmap = token_map(self.lineage, self.featurizer.tokenizer_version, st.tokenizer_version,
                             cfg.num_levels, cfg.codebook_size)
        except MigrationError as exc:
            raise CheckpointError(str(exc)) from None
        rows = migrate(self.learner.models, self.learner.optimizers, tmap)
        log.warning("migrated checkpoint step %d from tokenizer %s to %s: %d of %d gen ids moved to their nearest "
                    "old code, %d mem ids started from an old piece", st.step, tmap.parent, tmap.version,
                    tmap.gen_moved, len(tmap.gen_src), len(tmap.mem_src))
        st.extra.setdefault("migrations", []).append(
            {"from": tmap.parent, "to": tmap.version, "step": st.step, "gen_moved": tmap.gen_moved,
             "mem_started": len(tmap.mem_src), "rows": rows})
        st.tokenizer_version = tmap.version

    # --- one micro-batch ---------------------------------------------------------------------
    def join(self, records: Sequence[Record]) -> tuple[pd.DataFrame, float]:
        """The PIT join of a micro-batch and the seconds it took (may run in a prefetch thread)."""
        t = time.perf_counter()
        joined = self.joiner(records_frame(self.trainable(records)))
        return joined, time.perf_counter() - t

    def trainable(self, records: Sequence[Record]) -> list[Record]:
        """The records the weights do not hold yet: all of them, or, after a warm start
        (trainer/warm_start.py), those at or after its `trained_until` second."""
        until = self.state.extra.get(TRAINED_UNTIL)
        return list(records) if until is None else [r for r in records if r.event_time >= until]

    def process(self, records: Sequence[Record], joined: "Future | None" = None) -> dict:
        """One step of the protocol: join (or take the prefetched join), score with every model,
        then train every model, advance offsets, checkpoint; returns per-model batch metrics
        (computed from the scores taken before training). Records a warm start already trained
        on (`trainable`) only advance the offsets."""
        t0 = time.perf_counter()
        if not self.trainable(records):
            if joined is not None:
                joined.cancel()
            self._advance(records, n_trained=0)
            return {}
        joined, busy = joined.result() if joined is not None else self.join(records)
        t1 = time.perf_counter()
        batch, fst = self.featurizer(joined)
        self.fstats.add(fst)
        t2 = time.perf_counter()
        probs, parts, predict_s = self._score_then_train(batch)
        t3 = t2 + predict_s
        t4 = time.perf_counter()
        self._hook("trained")
        for name, peer in self.peers.items():  # per event: each row scored, then learned
            probs[name], parts[name] = peer.score_then_learn(joined), {}
        self.timings.add(peers_s=time.perf_counter() - t4)
        ckpt_s = self._advance(records, n_trained=len(batch))
        t5 = time.perf_counter()
        self.timings.add(join_s=t1 - t0, join_busy_s=busy, featurize_s=t2 - t1, predict_s=t3 - t2, train_s=t4 - t3,
                         checkpoint_s=ckpt_s, total_s=t5 - t0)
        y = batch.label.numpy()
        metrics = {n: {"auc": auc(y, p), "logloss": logloss(y, p), **parts[n]} for n, p in probs.items()}
        self._log(len(records), metrics, fst, t1 - t0, t5 - t0)
        if self.on_batch is not None:
            self.on_batch(t5 - t0, metrics)
        if self.keep_predictions:
            self.predictions.append(joined[["user_id", "item_id", "label", "event_time", "created_at"]]
                                    .assign(known=batch.known.numpy(), **{f"score_{n}": p for n, p in probs.items()}))
        return metrics

    def _advance(self, records: Sequence[Record], n_trained: int) -> float:
        """Offsets past `records` (of which `n_trained` were trained, the rest skipped as already in the
        warm-started weights), the journal line, and a checkpoint when one is due (its seconds)."""
        trained = n_trained > 0
        if n_trained < len(records):
            self.state.extra["skipped_trained"] = self.state.extra.get("skipped_trained", 0) + len(records) - n_trained
        if trained:
            self.state.step += 1
        self.state.events_seen += len(records)
        for r in records:
            key = r.partition
            self.state.offsets[key] = max(self.state.offsets.get(key, 0), r.offset + 1)
        self._pending += 1
        self._journal({"kind": "trained" if trained else "skipped", "step": self.state.step, "n": len(records),
                       "offsets": offset_runs(records)})
        return self.checkpoint() if self._pending >= self.checkpoint_every else 0.0

    def _score_then_train(self, batch) -> tuple[dict, dict, float]:
        """Chunk by chunk (`LearnerConfig.score_every`): every model scores the chunk (test), then
        every model trains on it. Returns the scores, the mean loss parts, seconds spent scoring."""
        n = len(batch)
        step = self.learner.lcfg.score_every or n
        probs: dict[str, list] = {m: [] for m in self.learner.names}
        sums: dict[str, dict[str, float]] = {m: {} for m in self.learner.names}
        predict_s, chunks = 0.0, 0
        cuts = chunk_bounds(batch.event_time, step, n)
        for s, e in zip(cuts[:-1], cuts[1:]):
            chunk = batch.slice(slice(s, e))
            t = time.perf_counter()
            for m, p in self.learner.predict_then_learn_users(chunk).items():  # test (per-user part: per second) ...
                probs[m].append(p)
            predict_s += time.perf_counter() - t
            if s == 0:
                self._hook("predicted")
            for m, part in self.learner.train(chunk).items():  # ... then train
                for k, v in part.items():
                    sums[m][k] = sums[m].get(k, 0.0) + v
            chunks += 1
        joined = {m: np.concatenate(p) if p else np.zeros(0, np.float32) for m, p in probs.items()}
        return joined, {m: {k: v / max(chunks, 1) for k, v in d.items()} for m, d in sums.items()}, predict_s

    @property
    def unpublished(self) -> bool:
        """Whether steps were trained since the last published model version (False without a publisher,
        or with one that never publishes)."""
        pub = self.publisher
        return pub is not None and pub.every > 0 and self.state.step > pub.last_published

    def finish(self) -> None:
        """The trainer stops (the end of the events it was given, an idle timeout): checkpoint what is
        pending and publish the last step whatever `publisher.every` says, so serving gets every step
        trained (a run shorter than `every` steps had published no model at all). A checkpoint already
        written for this step is published as it is, never written again: rewriting the directory
        LATEST names would open a window in which a kill leaves no loadable checkpoint."""
        if self._pending:
            self.checkpoint(final=True)
        elif self.unpublished and (latest := read_pointer(self.checkpoint_dir)) is not None:
            self._publish(latest, final=True)

    def checkpoint(self, final: bool = False) -> float:
        """Write a checkpoint now (offsets included) and maybe publish a model version (`final`: publish
        it regardless of `publisher.every`, see `finish`); seconds taken."""
        t = time.perf_counter()
        self._hook("checkpoint")
        path = save_checkpoint(self.checkpoint_dir, self.learner.models, self.learner.optimizers, self.state)
        self.checkpointed_offsets = dict(self.state.offsets)
        self.checkpointed_at = time.time()
        self._pending = 0
        self._journal({"kind": "checkpoint", "step": self.state.step, "events_seen": self.state.events_seen,
                       "path": path.name, "offsets": dict(self.state.offsets)})
        self._publish(path, final)
        self._hook("checkpointed")
        return time.perf_counter() - t

    def _publish(self, path: Path, final: bool) -> None:
        if self.publisher is None:
            return
        step = self.state.step
        version = self.publisher.publish(path, step) if final and self.unpublished else \
            self.publisher.maybe_publish(path, step)
        if version is not None:
            self._journal({"kind": "published", "step": step, "version": version.name})

    def _hook(self, phase: str) -> None:
        if self.fail_at is not None:
            self.fail_at(phase, self.state.step)

    def _journal(self, entry: dict) -> None:
        """Append one line to the progress journal (see docs/faults.md, "Trainer crash").

        One write() per line, flushed on close: a line survives a kill -9 of the process once this
        returns (not a power loss; the journal is a progress record, not the source of truth:
        the checkpoint is). A kill during the write can leave a truncated last line."""
        if self.journal_path is None:
            return
        line = json.dumps({**entry, "pid": os.getpid(), "time": round(time.time(), 3)}) + "\n"
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal_path, "a") as f:
            f.write(line)

    def _log(self, n: int, metrics: dict, fst: FeaturizeStats, join_s: float, total_s: float) -> None:
        if self.log_path is None:
            return
        with open(self.log_path, "a") as f:
            for name, m in metrics.items():
                f.write(json.dumps({"step": self.state.step, "events_seen": self.state.events_seen, "batch": n,
                                    "model": name, "unknown_item": fst.unknown_item, "join_s": round(join_s, 4),
                                    "batch_s": round(total_s, 4), "time": time.time(),
                                    **{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in m.items()}})
                        + "\n")

    def prediction_frame(self) -> pd.DataFrame:
        return pd.concat(self.predictions, ignore_index=True) if self.predictions else pd.DataFrame()


# --- in-memory source ------------------------------------------------------------------------
def run_events(trainer: ContinuousTrainer, events: Sequence, batch_size: int,
               max_events: int | None = None, resume: bool = True, prefetch: bool = True) -> int:
    """Train over `events` (objects with user_id, item_id, label, event_time, in event-time order)
    as one partition.

    Position = index in the list; a resumed trainer starts at its checkpoint's offset. Micro-batches
    hold about `batch_size` events and end where the second changes (`batch.batch_cut`); a run cut
    short by `max_events` ends where it was told to, even inside a second, and a second of more than
    8 × `batch_size` events is split (with a warning), as from Kafka. With
    `prefetch`, the next micro-batch's join runs in a thread while this one trains (the join
    reads only the feature store, never the model, so results are identical). Returns the
    number of events processed by this call.
    """
    if resume:
        trainer.resume()
    start = trainer.state.offsets.get(MEMORY_PARTITION, 0)
    end = len(events) if max_events is None else min(len(events), start + max_events)
    records = [Record(int(e.user_id), int(e.item_id), int(e.label), int(e.event_time), MEMORY_PARTITION, i)
               for i, e in enumerate(events[start:end], start=start)]
    seconds = np.fromiter((r.event_time for r in records), np.int64, len(records))
    chunks, s = [], 0
    while s < len(records):  # micro-batches split a second only past the bound (batch.batch_cut), as from Kafka
        k = batch_cut(seconds[s:], batch_size, final=True)
        if splits_second(seconds[s:], k):
            log.warning("second %d holds more than %d events: split between micro-batches (batch.batch_cut)",
                        int(seconds[s + k]), k)
        chunks.append(records[s:s + k])
        s += k
    done = 0
    with ThreadPoolExecutor(1, thread_name_prefix="trm-join") as pool:
        ahead = pool.submit(trainer.join, chunks[0]) if prefetch and chunks else None
        try:
            for k, chunk in enumerate(chunks):
                current = ahead
                ahead = pool.submit(trainer.join, chunks[k + 1]) if prefetch and k + 1 < len(chunks) else None
                trainer.process(chunk, current)
                done += len(chunk)
        finally:
            if ahead is not None:
                ahead.cancel()
    trainer.finish()  # checkpoint and publish what was trained
    return done


def events_from(items: Iterable) -> list[Record]:
    """Any objects with user_id, item_id, label, event_time -> in-memory records."""
    return [Record(int(e.user_id), int(e.item_id), int(e.label), int(e.event_time), MEMORY_PARTITION, i)
            for i, e in enumerate(items)]


# --- the headline metric ---------------------------------------------------------------------
@dataclass(frozen=True)
class CutoffSummary:
    """The prequential metrics of the events at or after `cutoff`."""

    cutoff: int
    n_events: int  # kept predictions with event_time >= cutoff
    models: dict[str, dict]  # per model: trainer.metrics.summarize of its scores on those events


def summarize_after_cutoff(predictions: pd.DataFrame, models: Sequence[str], cutoff: int,
                           fit_cutoff: int | None = None) -> CutoffSummary:
    """Metrics of every model's prequential scores on the events at or after `cutoff`.

    `predictions` is `ContinuousTrainer.prediction_frame()` (a `score_<model>` column per model);
    `fit_cutoff` (epoch s, the tokenizer's) adds the bucket of items created after the tokenizer
    was fitted (see trainer.metrics.summarize). The demo passes its cutoff as both.
    """
    after = predictions[predictions["event_time"] >= cutoff]
    return CutoffSummary(cutoff, len(after),
                         {n: summarize(after, f"score_{n}", fit_cutoff=fit_cutoff) for n in models})
