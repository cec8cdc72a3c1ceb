"""The stream worker: item, interaction and item-stats agents hosted by a Faust app (`trm worker`).

Faust hosts and supervises (`faust.App` with the web server disabled, broker session timeout
from KafkaConfig — Tansu makes a group join wait ~half of it): its Worker owns the event loop,
signals and logging, and starts `StreamWorker` as an app service. `StreamWorker` runs the agents
as `BatchLoop`s (see batch_loop.py for why they are aiokafka `getmany` loops and not per-message
Faust agents) and can also be run without Faust in any asyncio program (tests, benchmark):

    async with StreamWorker(WorkerSettings(repo_path=..., tokenizer_dir=...)) as w:
        await w.wait_for(items=200, interactions=2000, timeout=60)

Progress is also written to `<state_dir>/status.json` after every batch, for a supervisor or a
test driving a `trm worker` subprocess.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from streams.errors import StreamsError
from streams.kafka_config import KafkaConfig

from .batch_loop import BatchLoop, LoopSettings
from .contract.topics import (
    DEFAULT_WORKER_GROUPS,
    INTERACTIONS,
    INTERACTIONS_BY_ITEM,
    ITEM_STATS,
    ITEM_TOKENS,
    ITEMS,
    WorkerGroups,
)

AGENTS = (ITEMS, INTERACTIONS, ITEM_STATS)

log = logging.getLogger(__name__)


class WorkerConfigError(StreamsError, ValueError):
    """Worker settings that cannot run (no Feast repo, no tokenizer for the item agent)."""


@dataclass
class WorkerSettings:
    repo_path: str | Path  # an applied Feast repo (streams.feature_repo_tools.materialize_repo)
    tokenizer_dir: str | Path | None = None  # required by the item agent
    state_dir: str | Path | None = None  # default <repo>/stream_state
    pairs_dir: str | Path | None = None  # default <repo>/data/pairs
    agents: tuple[str, ...] = AGENTS
    app_id: str = DEFAULT_WORKER_GROUPS.app_id
    history_len: int = 20
    recent_len: int = 20  # R: a user's last applied events (positives and negatives) in its row
    pair_window: int = 5
    park_timeout_s: float = 900.0  # generous: a full catalogue replay tokenizes for minutes
    # event-time seconds an interaction may lag the newest one of its partition and still be placed
    # exactly; later ones are dead-lettered (`late`); older state is compacted (streams/state/user_history.py)
    allowed_lateness_s: float = 7 * 86_400.0
    item_batch: int = 256
    interaction_batch: int = 20_000  # measured: ~1.2x the events per CPU-second of 5k batches
    interaction_threaded: bool = True
    # a failing batch (Feast or Kafka down) is retried in place with backoff (batch_loop.py)
    retry_initial_s: float = 0.5
    retry_max_s: float = 15.0
    retry_budget_s: float = 240.0
    metrics_port: int | None = None  # serve Prometheus /metrics on it (streams/metrics.py); None: off
    metrics_host: str = "127.0.0.1"
    kafka: KafkaConfig | None = None  # default KafkaConfig.from_env()

    def resolved(self) -> "WorkerSettings":
        repo = Path(self.repo_path).resolve()
        if not (repo / "feature_store.yaml").exists():
            raise WorkerConfigError(f"{repo} is not an applied Feast repo: run `trm feast-repo --out {repo}` first")
        bad = set(self.agents) - set(AGENTS)
        if bad:
            raise WorkerConfigError(f"unknown agents {sorted(bad)}: choose from {', '.join(AGENTS)}")
        if ITEMS in self.agents:
            if self.tokenizer_dir is None:
                raise WorkerConfigError("the item agent needs a tokenizer artifact: pass --tokenizer DIR "
                                        "(`trm tokenizer fit` writes one), or run with --agents interactions")
            if not Path(self.tokenizer_dir).exists():
                raise WorkerConfigError(f"tokenizer artifact {self.tokenizer_dir} does not exist")
            verify_artifacts(self.tokenizer_dir, repo)
        return WorkerSettings(**{**asdict(self), "kafka": self.kafka or KafkaConfig.from_env(), "repo_path": repo,
                                 "state_dir": Path(self.state_dir or repo / "stream_state").resolve(),
                                 "pairs_dir": Path(self.pairs_dir or repo / "data" / "pairs").resolve()})


def verify_artifacts(tokenizer_dir: str | Path, repo: Path) -> None:
    """Refuse to start with an artifact this worker could not tokenize with: the one given and those
    of the repo's rotation record (streams/rotation.py) must verify, and their encoder must be the
    installed one. Caught here, a bad artifact stops the worker before it joins a group, instead of
    failing the item agent's first batch. Cheap: checksums, no model load."""
    from tokenizer.artifact import verify
    from tokenizer.errors import ArtifactError

    from .rotation import RotationError, read_rotation

    dirs = [Path(tokenizer_dir)]
    try:
        rot = read_rotation(repo)
    except RotationError as exc:
        raise WorkerConfigError(str(exc)) from None
    if rot is not None:
        dirs += [Path(rot.from_artifact), Path(rot.to_artifact)]
    for d in dict.fromkeys(dirs):
        try:
            verify(d)
        except ArtifactError as exc:
            raise WorkerConfigError(f"tokenizer artifact {d} cannot run on this worker: {exc}") from None


class StreamWorker:
    def __init__(self, settings: WorkerSettings):
        self.s = settings.resolved()
        self.config: KafkaConfig = self.s.kafka
        self.loops: dict[str, BatchLoop] = {}
        self.tokens = None
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()
        self.metrics = None  # streams.metrics.WorkerMetrics
        self.metrics_server = None

    # -- construction of the processors (run inside each loop's own thread) --
    def _make_item_processor(self):
        from tokenizer.hybrid import HybridTokenizer

        from .feast_sink import FeastSink
        from .item_agent import ItemProcessor
        from .rotation import RotationWatch

        return ItemProcessor(FeastSink(self.s.repo_path, writer_id=f"items-{os.getpid()}"),
                             HybridTokenizer.load(self.s.tokenizer_dir), rotation=RotationWatch(self.s.repo_path),
                             load=HybridTokenizer.load)

    def _make_interaction_processor(self):
        from .feast_sink import FeastSink
        from .interaction_agent import InteractionProcessor
        from .rotation import RotationWatch

        tokens = self.tokens
        return InteractionProcessor(FeastSink(self.s.repo_path, writer_id=f"interactions-{os.getpid()}"),
                                    self.s.state_dir, self.s.pairs_dir, tokens.get,
                                    self.config.topic(INTERACTIONS), history_len=self.s.history_len,
                                    recent_len=self.s.recent_len, pair_window=self.s.pair_window,
                                    park_timeout_s=self.s.park_timeout_s, allowed_lateness_s=self.s.allowed_lateness_s,
                                    rotation=RotationWatch(self.s.repo_path), tokens_in=tokens.get_version,
                                    version_now=lambda: tokens.latest_version, tokens_position=tokens.position)

    def _make_item_stats_processor(self):
        from .feast_sink import FeastSink
        from .item_stats_agent import ItemStatsProcessor

        return ItemStatsProcessor(FeastSink(self.s.repo_path, writer_id=f"item-stats-{os.getpid()}"),
                                  self.s.state_dir, self.config.topic(INTERACTIONS_BY_ITEM),
                                  allowed_lateness_s=self.s.allowed_lateness_s)

    def _retry(self) -> dict:
        return {"retry_initial_s": self.s.retry_initial_s, "retry_max_s": self.s.retry_max_s,
                "retry_budget_s": self.s.retry_budget_s}

    async def start(self) -> "StreamWorker":
        from .contract.topics import create_topics
        from .token_cache import TokenCache

        tune_gc()
        groups = WorkerGroups(self.s.app_id)
        Path(self.s.state_dir).mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(create_topics, self.config)  # never let a metadata request auto-create them
        if ITEMS in self.s.agents:
            self.loops[ITEMS] = BatchLoop(
                self.config, LoopSettings(ITEMS, groups.items, output_topic=ITEM_TOKENS,
                                          max_records=self.s.item_batch, poll_timeout_ms=50, **self._retry()),
                self._make_item_processor, on_batch=self.write_status)
        if INTERACTIONS in self.s.agents:
            self.tokens = TokenCache(self.config, ITEM_TOKENS)
            self._tasks.append(asyncio.create_task(self.tokens.run(), name="trm-token-cache"))
            self.loops[INTERACTIONS] = BatchLoop(
                self.config, LoopSettings(INTERACTIONS, groups.interactions,
                                          output_topic=INTERACTIONS_BY_ITEM, max_records=self.s.interaction_batch,
                                          threaded=self.s.interaction_threaded, **self._retry()),
                self._make_interaction_processor, on_batch=self.write_status, wake=self.tokens.wake)
        if ITEM_STATS in self.s.agents:  # consumes what the interaction agents (of every worker) forward
            self.loops[ITEM_STATS] = BatchLoop(
                self.config, LoopSettings(INTERACTIONS_BY_ITEM, groups.item_stats,
                                          max_records=self.s.interaction_batch,
                                          threaded=self.s.interaction_threaded, **self._retry()),
                self._make_item_stats_processor, on_batch=self.write_status)
        if self.s.metrics_port is not None:
            from .metrics import WorkerMetrics, serve

            self.metrics = WorkerMetrics(self)
            for name, lp in self.loops.items():
                lp.on_timed = self.metrics.timed(name)
            self.metrics_server = serve(self.metrics.registry, self.s.metrics_port, self.s.metrics_host)
        for name, lp in self.loops.items():
            if self.tokens is not None:
                lp.on_log_reset = self.tokens.rewind  # the broker lost its logs: item_tokens restarted too
            self._tasks.append(asyncio.create_task(lp.run(), name=f"trm-{name}"))
        return self

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every loop has its partitions (a Tansu group join takes ~session_timeout/2)."""
        await asyncio.wait_for(asyncio.gather(*(lp.ready.wait() for lp in self.loops.values())), timeout)

    async def wait_for(self, items: int = 0, interactions: int = 0, timeout: float = 120.0,
                       include_dead: bool = True) -> None:
        """Until the agents have handled (processed, skipped as already applied, dropped as a duplicate,
        or dead-lettered) at least these many events, and this worker's item-stats agent has
        committed past everything its interaction agent forwarded (`caught_up`). Parked
        interactions are not handled yet."""
        deadline = time.monotonic() + timeout
        while True:
            self.raise_if_failed()
            done = {k: lp.counters.processed + lp.counters.skipped + lp.counters.duplicates
                    + (lp.counters.dead_lettered if include_dead else 0) for k, lp in self.loops.items()}
            if done.get(ITEMS, 0) >= items and done.get(INTERACTIONS, 0) >= interactions and self.caught_up():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:.0f} s the worker handled {done}; wanted items={items}, "
                                   f"interactions={interactions}; status: {self.status()}")
            await asyncio.sleep(0.05)

    def caught_up(self) -> bool:
        """Has the item-stats agent committed past every record this worker's interaction agent
        forwarded (to the partitions it owns; other workers' partitions are theirs)? True without
        either agent."""
        src, dst = self.loops.get(INTERACTIONS), self.loops.get(ITEM_STATS)
        if src is None or dst is None:
            return True
        owned = dst.owned()
        return all(dst.committed.get(p, 0) >= end for p, end in src.produced.items() if p in owned)

    def raise_if_failed(self) -> None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise RuntimeError(f"worker task {t.get_name()} failed: {t.exception()!r}") from t.exception()

    def status(self) -> dict:
        st = {name: {**asdict(lp.counters), "retries": lp.retries, "failing_since": lp.failing_since,
                     "log_resets": lp.log_resets}
              for name, lp in self.loops.items()}
        if self.tokens is not None:
            st["token_cache"] = {"items": len(self.tokens.gen), "received": self.tokens.received}
        st["uptime_s"] = round(time.time() - self.started_at, 3)
        return st

    def write_status(self) -> None:
        path = Path(self.s.state_dir) / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        os.replace(tmp, path)

    async def stop(self, drain_s: float = 30.0) -> None:
        """Stop the agents. The item-stats agent stops last: once the interaction agent has stopped,
        it drains what is in its partitions (until a poll finds nothing new, at most `drain_s`), so
        a graceful stop leaves every forwarded interaction counted."""
        last = self.loops.get(ITEM_STATS)
        for lp in self.loops.values():
            if lp is not last:
                lp.stop()
        if self.tokens is not None:
            self.tokens.stop()
        mine = [t for t in self._tasks if t.get_name() == f"trm-{ITEM_STATS}"]
        if last is not None and mine and not mine[0].done():
            await asyncio.gather(*(t for t in self._tasks if t not in mine), return_exceptions=True)
            last.stop(when_idle=True)
            idle = asyncio.ensure_future(asyncio.shield(last.idle_stop))
            done, _ = await asyncio.wait({idle, mine[0]}, timeout=drain_s, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            if not done:
                log.warning("item-stats agent still busy after %.0f s; stopping it (its replay resumes)", drain_s)
            last.stop()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        self.write_status()
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                log.error("worker task ended with %r", r)

    async def __aenter__(self) -> "StreamWorker":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def tune_gc() -> None:
    """Measured: CPython's default GC thresholds cost ~40 % of the interaction agent's CPU (young
    collections triggered by per-event tuples/dicts keep rescanning the long-lived state).
    Freezing what exists at start-up and collecting the young generation less often gives ~1.6x."""
    import gc

    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def build_app(settings: WorkerSettings):
    """A Faust app hosting StreamWorker as a service (web server off, Tansu-friendly session timeout)."""
    import faust
    import mode

    s = settings.resolved()
    (Path(s.state_dir) / "faust").mkdir(parents=True, exist_ok=True)
    worker_holder: dict = {}

    class StreamService(mode.Service):
        async def on_start(self) -> None:
            w = worker_holder["worker"] = StreamWorker(s)
            await w.start()
            self.add_future(self._watch(w))

        async def _watch(self, w: StreamWorker) -> None:
            while True:  # a failed loop crashes the worker (exit code 1) so its supervisor restarts it
                await asyncio.sleep(0.5)
                try:
                    w.raise_if_failed()
                except RuntimeError as exc:
                    await self.crash(exc)
                    return

        async def on_stop(self) -> None:
            w = worker_holder.get("worker")
            if w is not None:
                await w.stop()

    app = faust.App(s.app_id, web_enabled=False, datadir=str(Path(s.state_dir) / "faust"),
                    topic_partitions=1, **s.kafka.faust_kwargs())
    app.service(StreamService)
    app.trm_worker = worker_holder  # type: ignore[attr-defined]
    return app


def run_worker(settings: WorkerSettings, loglevel: str = "warn") -> int:
    """`trm worker`: run the Faust worker until SIGINT/SIGTERM."""
    import faust

    try:
        app = build_app(settings)
    except WorkerConfigError as exc:
        print(f"error: {exc}")
        return 2
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
