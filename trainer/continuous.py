"""The continuous trainer: micro-batches of labelled events -> PIT join -> test, then train -> checkpoint.

Offsets live in the checkpoint, next to the weights they produced. Kafka offsets are committed
only after the checkpoint is durable, and a restart seeks to the checkpoint's offsets, so a
crash replays at most the batch that was trained but not yet checkpointed, and skips nothing.
The same `ContinuousTrainer.process` runs under Kafka (`follow`) and over an in-memory list of
events (`run_events`, for tests and benchmarks). With `journal_path` every trained batch (its
offsets) and every checkpoint is appended to a JSON-lines progress journal (`trm train --journal`).
"""
from __future__ import annotations

import asyncio
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

from .batch import Featurizer, FeaturizeStats
from .checkpoint import (CheckpointError, ModelPublisher, TrainState, load_latest, remove_stale_temps,
                         save_checkpoint)
from .learner import Learner
from .metrics import auc, logloss

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


class TrainerCrash(RuntimeError):
    """Raised by a test hook to simulate the process dying at a given point of a batch."""


@dataclass
class ContinuousTrainer:
    learner: Learner
    joiner: Callable[[pd.DataFrame], pd.DataFrame]  # events -> PIT-joined rows (dataset.FeastJoiner)
    featurizer: Featurizer
    checkpoint_dir: Path
    publisher: ModelPublisher | None = None
    log_path: Path | None = None  # prequential metrics, one JSON line per (batch, model)
    journal_path: Path | None = None  # progress journal: one JSON line per trained batch and per checkpoint
    checkpoint_every: int = 1  # batches between checkpoints (offsets advance only with them)
    keep_predictions: bool = False
    fail_at: Callable[[str, int], None] | None = None  # test hook: (phase, step) -> may raise TrainerCrash
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
            raise CheckpointError(
                f"checkpoint was trained on tokenizer {st.tokenizer_version}, features now use "
                f"{self.featurizer.tokenizer_version}: gen-token ids changed meaning; start a new checkpoint dir")
        self.state = st
        self.checkpointed_offsets = dict(st.offsets)
        return True

    # --- one micro-batch ---------------------------------------------------------------------
    def join(self, records: Sequence[Record]) -> tuple[pd.DataFrame, float]:
        """The PIT join of a micro-batch and the seconds it took (may run in a prefetch thread)."""
        t = time.perf_counter()
        joined = self.joiner(records_frame(records))
        return joined, time.perf_counter() - t

    def process(self, records: Sequence[Record], joined: "Future | None" = None) -> dict:
        """Join (or take the prefetched join), score (prequential), train, advance offsets,
        checkpoint; returns per-model batch metrics."""
        t0 = time.perf_counter()
        joined, busy = joined.result() if joined is not None else self.join(records)
        t1 = time.perf_counter()
        batch, fst = self.featurizer(joined)
        self.fstats.add(fst)
        t2 = time.perf_counter()
        probs = self.learner.predict(batch)  # test ...
        t3 = time.perf_counter()
        self._hook("predicted")
        parts = self.learner.train(batch)  # ... then train
        t4 = time.perf_counter()
        self._hook("trained")
        self.state.step += 1
        self.state.events_seen += len(records)
        for r in records:
            key = r.partition
            self.state.offsets[key] = max(self.state.offsets.get(key, 0), r.offset + 1)
        self._pending += 1
        self._journal({"kind": "trained", "step": self.state.step, "n": len(records), "offsets": offset_runs(records)})
        ckpt_s = 0.0
        if self._pending >= self.checkpoint_every:
            ckpt_s = self.checkpoint()
        t5 = time.perf_counter()
        self.timings.add(join_s=t1 - t0, join_busy_s=busy, featurize_s=t2 - t1, predict_s=t3 - t2, train_s=t4 - t3,
                         checkpoint_s=ckpt_s, total_s=t5 - t0)
        y = batch.label.numpy()
        metrics = {n: {"auc": auc(y, p), "logloss": logloss(y, p), **parts[n]} for n, p in probs.items()}
        self._log(len(records), metrics, fst, t1 - t0, t5 - t0)
        if self.keep_predictions:
            self.predictions.append(joined[["user_id", "item_id", "label", "event_time", "created_at"]]
                                    .assign(known=batch.known.numpy(), **{f"score_{n}": p for n, p in probs.items()}))
        return metrics

    def checkpoint(self) -> float:
        """Write a checkpoint now (offsets included) and maybe publish a model version; seconds taken."""
        t = time.perf_counter()
        self._hook("checkpoint")
        path = save_checkpoint(self.checkpoint_dir, self.learner.models, self.learner.optimizers, self.state)
        self.checkpointed_offsets = dict(self.state.offsets)
        self._pending = 0
        self._journal({"kind": "checkpoint", "step": self.state.step, "events_seen": self.state.events_seen,
                       "path": path.name, "offsets": dict(self.state.offsets)})
        if self.publisher is not None:
            version = self.publisher.maybe_publish(path, self.state.step)
            if version is not None:
                self._journal({"kind": "published", "step": self.state.step, "version": version.name})
        self._hook("checkpointed")
        return time.perf_counter() - t

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
    """Train over `events` (objects with user_id, item_id, label, event_time) as one partition.

    Position = index in the list; a resumed trainer starts at its checkpoint's offset. With
    `prefetch`, the next micro-batch's join runs in a thread while this one trains (the join
    reads only the feature store, never the model, so results are identical). Returns the
    number of events processed by this call.
    """
    if resume:
        trainer.resume()
    start = trainer.state.offsets.get(MEMORY_PARTITION, 0)
    end = len(events) if max_events is None else min(len(events), start + max_events)
    chunks = [[Record(int(e.user_id), int(e.item_id), int(e.label), int(e.event_time), MEMORY_PARTITION, i)
               for i, e in enumerate(events[s:min(s + batch_size, end)], start=s)]
              for s in range(start, end, batch_size)]
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
    if trainer._pending:
        trainer.checkpoint()
    return done


# --- Kafka source ----------------------------------------------------------------------------
def _decode(codec, msg) -> Record | None:
    from streams.codec import DecodeError
    from streams.events import InteractionEvent, InvalidEvent

    try:
        ev = InteractionEvent.from_record(codec.decode(msg.value, expect="InteractionEvent"))
    except (DecodeError, InvalidEvent, KeyError, TypeError) as exc:
        log.warning("skipping %s:%d@%d: %s", msg.topic, msg.partition, msg.offset, exc)
        return None
    return Record(ev.user_id, ev.item_id, ev.label, ev.event_time, f"{msg.topic}:{msg.partition}", msg.offset)


async def _wait_for_features(gate, records: Sequence[Record], timeout_s: float, by_item=None) -> bool:
    """Until the feature workers' group has committed past every record of the batch.

    The workers commit an offset only after writing the features of the events before it, so
    past that point the PIT join sees every earlier event of the same user. Gives up (stale
    features, never leaked ones) after `timeout_s`; returns whether the workers caught up.

    Item counters are written by the item-stats agent from `interactions_by_item`, which the
    interaction agent produces (acked) before it commits: so once the first gate passes, every
    batch record's forwarded copy is below that topic's current end. `by_item` = (item-stats
    group consumer, reader, topic partitions): wait until that group has committed up to the
    ends seen then. The ends come from a fetch's high watermark (Tansu's ListOffsets answers 1).
    """
    from aiokafka import TopicPartition

    need: dict[str, int] = {}
    for r in records:
        need[r.partition] = max(need.get(r.partition, 0), r.offset + 1)
    deadline = time.monotonic() + timeout_s
    while True:
        behind = []
        for key, off in need.items():
            t, p = key.rsplit(":", 1)
            got = await gate.committed(TopicPartition(t, int(p)))
            if got is None or got < off:
                behind.append((key, got, off))
        if not behind:
            break
        if time.monotonic() > deadline:
            log.warning("feature workers still behind after %.0f s (%s); training on the features there are",
                        timeout_s, behind[:3])
            return False
        await asyncio.sleep(0.2)
    if by_item is None:
        return True
    item_gate, reader, tps = by_item
    for tp in tps:  # one fetch just below the group's position: its response carries the high watermark
        reader.seek(tp, max(0, (await item_gate.committed(tp) or 0) - 1))
    await reader.getmany(timeout_ms=500, max_records=1)
    ends = {tp: reader.highwater(tp) or 0 for tp in tps}
    while True:
        behind = [(tp.partition, got, end) for tp, end in ends.items()
                  if end and ((got := await item_gate.committed(tp)) is None or got < end)]
        if not behind:
            return True
        if time.monotonic() > deadline:
            log.warning("item-stats workers still behind after %.0f s (%s); training on the item counters there are",
                        timeout_s, behind[:3])
            return False
        await asyncio.sleep(0.2)


async def follow(trainer: ContinuousTrainer, kafka, group_id: str = "trm-trainer", batch_size: int = 1024,
                 max_events: int | None = None, idle_timeout_s: float | None = 10.0,
                 linger_s: float = 1.0, topic: str | None = None, feature_group: str | None = None,
                 feature_wait_s: float = 60.0) -> int:
    """Consume the interactions topic with its own group, training per micro-batch.

    `kafka` is a trm.config.KafkaConfig. Stops after `max_events` (if given) or after
    `idle_timeout_s` without a message (None: run until cancelled). With `feature_group` (the
    streams workers' group, e.g. "trm-worker-interactions") a batch waits until those workers
    have committed past it, so the trainer never outruns the features; for a group named
    "<app>-interactions" also the item-stats group "<app>-item-stats" (item counters, computed
    from `interactions_by_item`). Returns events processed.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener

    from streams.codec import AvroCodec

    trainer.resume()
    codec = AvroCodec()
    topic = topic or kafka.topic("interactions")
    consumer = AIOKafkaConsumer(
        group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms, heartbeat_interval_ms=max(kafka.session_timeout_ms // 4, 500),
        max_poll_interval_ms=600_000, **kafka.aiokafka_kwargs())

    class SeekToCheckpoint(ConsumerRebalanceListener):
        """The checkpoint, not the group's committed offset, says where to continue."""

        async def on_partitions_revoked(self, revoked) -> None:
            pass

        async def on_partitions_assigned(self, assigned) -> None:
            for tp in assigned:
                off = trainer.state.offsets.get(f"{tp.topic}:{tp.partition}")
                if off is not None:
                    consumer.seek(tp, off)

    consumer.subscribe([topic], listener=SeekToCheckpoint())
    await consumer.start()
    gate = None
    if feature_group:  # reads the workers' committed offsets; never joins their group
        gate = AIOKafkaConsumer(group_id=feature_group, enable_auto_commit=False, **kafka.aiokafka_kwargs())
        await gate.start()
    by_item = None
    if feature_group and feature_group.endswith("-interactions"):  # the streams worker's item-stats group
        item_topic = kafka.topic("interactions_by_item")
        parts = (await gate._client.fetch_all_metadata()).partitions_for_topic(item_topic)
        if parts:
            item_gate = AIOKafkaConsumer(group_id=feature_group[:-len("interactions")] + "item-stats",
                                         enable_auto_commit=False, **kafka.aiokafka_kwargs())
            reader = AIOKafkaConsumer(enable_auto_commit=False, max_partition_fetch_bytes=64 * 1024,
                                      **kafka.aiokafka_kwargs())
            await item_gate.start()
            await reader.start()
            tps = [TopicPartition(item_topic, p) for p in sorted(parts)]
            reader.assign(tps)
            by_item = (item_gate, reader, tps)
    pool = ThreadPoolExecutor(1, thread_name_prefix="trm-join")
    done, buf = 0, []
    inflight: tuple[list[Record], Future] | None = None  # joined (or joining) while the previous batch trains
    last_commit: dict = {}

    async def commit_checkpointed() -> None:
        """Commit the offsets of the last durable checkpoint (never of a batch not yet in one)."""
        nonlocal last_commit
        offsets = {}
        for key, off in trainer.checkpointed_offsets.items():
            t, p = key.rsplit(":", 1)
            if t == topic:
                offsets[TopicPartition(t, int(p))] = off
        if offsets and offsets != last_commit:
            await consumer.commit(offsets)
            last_commit = offsets

    async def train_inflight() -> None:
        nonlocal inflight, done
        recs, fut = inflight
        inflight = None
        await asyncio.to_thread(trainer.process, recs, fut)  # heartbeats keep running meanwhile
        done += len(recs)
        await commit_checkpointed()

    last_msg = time.monotonic()
    try:
        while max_events is None or done + (len(inflight[0]) if inflight else 0) + len(buf) < max_events:
            taken = done + (len(inflight[0]) if inflight else 0)
            want = batch_size - len(buf) if max_events is None else min(batch_size - len(buf), max_events - taken - len(buf))
            data = await consumer.getmany(timeout_ms=int(linger_s * 1000), max_records=max(want, 1))
            for msgs in data.values():
                for m in msgs:
                    rec = _decode(codec, m)
                    if rec is not None:
                        buf.append(rec)
            if data:
                last_msg = time.monotonic()
            full = len(buf) >= batch_size or (max_events is not None and taken + len(buf) >= max_events)
            if buf and (full or not data):
                if gate is not None:
                    await _wait_for_features(gate, buf, feature_wait_s, by_item)
                joining = (buf, pool.submit(trainer.join, buf))
                buf = []
                if inflight is not None:
                    await train_inflight()  # batch k trains while batch k+1 joins
                inflight = joining
            elif inflight is not None and not data:
                await train_inflight()  # the stream paused: don't hold a joined batch back
            elif idle_timeout_s is not None and not buf and time.monotonic() - last_msg > idle_timeout_s:
                break
        if inflight is not None:
            await train_inflight()
        if trainer._pending:
            await asyncio.to_thread(trainer.checkpoint)
            await commit_checkpointed()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        await consumer.stop()
        if gate is not None:
            await gate.stop()
        if by_item is not None:
            await by_item[0].stop()
            await by_item[1].stop()
    return done


def follow_sync(trainer: ContinuousTrainer, kafka, **kw) -> int:
    return asyncio.run(follow(trainer, kafka, **kw))


def events_from(items: Iterable) -> list[Record]:
    """Any objects with user_id, item_id, label, event_time -> in-memory records."""
    return [Record(int(e.user_id), int(e.item_id), int(e.label), int(e.event_time), MEMORY_PARTITION, i)
            for i, e in enumerate(items)]
