"""`trm demo`: the whole product on one machine with the embedded defaults.

Order of work, each step finished before the next starts unless stated:

1. load the MovieLens-layout data and pick the cutoff (a quantile of the interaction timeline);
2. fit the tokenizer (collaborative alignment included) on items and interactions before it;
3. `feast apply` the feature repo into OUT/feature_repo and start the embedded Tansu broker;
4. start the stream worker (`trm worker`, a subprocess) and the continuous trainer (a thread of
   this process, its own consumer group, gated on the worker's committed offsets so it never
   outruns the features);
5. replay every item and interaction through Kafka in event-time order (items published before
   the cutoff are the back catalogue; later ones are new and tokenized in-stream); once the
   worker has written the features of every interaction, the trainer warm-starts on the events
   before the cutoff (trainer/warm_start.py: epochs over their point-in-time rows, early-stopped
   on the last 20 % of them), then follows the topic from its start, skipping what it trained;
6. when the trainer has consumed every interaction: measure freshness and raw consumer rate,
   score the prequential predictions of events after the cutoff, write report.json, report.md
   and the plots, print the summary table;
7. stop every process it started (also on Ctrl-C or error), by PID.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trm import DEFAULT_DATA_DIR
from trm.demo import MODELS, DemoError


@dataclass
class DemoConfig:
    data: Path = DEFAULT_DATA_DIR
    out: Path = Path("out/demo")
    cutoff_quantile: float = 0.5
    port: int | None = None
    models: tuple[str, ...] = MODELS
    batch_size: int = 2048
    levels: int = 3
    codebook: int = 256
    mem_vocab: int = 8192
    threads: int = 2
    freshness_probes: int = 200
    rankable_probes: int = 50  # publish -> `trm serve` ranks the new item with its tokens (trm/demo/probes.py)
    timeout_s: float = 900.0
    warm_epochs: int = 2  # warm start before the cutoff: most epochs (0: follow the whole stream cold)
    trainer: dict = field(default_factory=dict)  # RankerConfig overrides


class Processes:
    """Every child process the demo starts; `stop_all` ends them by PID, newest first."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
        fh = open(log, "ab")
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def check(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise DemoError(f"{name} (pid {p.pid}) exited with code {p.returncode}; see its log in the out dir")

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _handled(st: dict, loop: str) -> int:
    c = st.get(loop) or {}
    return int(c.get("processed", 0) + c.get("skipped", 0) + c.get("dead_lettered", 0))


def fit_tokenizer(cfg: DemoConfig, before, cutoff: int, console):
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    tcfg = TokenizerConfig(levels=cfg.levels, codebook_size=cfg.codebook, mem_vocab_size=cfg.mem_vocab,
                           threads=cfg.threads)
    console.print(f"[bold]2/6[/] fitting the tokenizer on {len(before.items):,} items and "
                  f"{len(before.interactions):,} interactions before the cutoff")
    tok = HybridTokenizer.fit(list(before.items.values()), before.interactions, tcfg, progress=True,
                              fit_cutoff=cutoff)
    tok.save(cfg.out / "tokenizer")
    return tok


def run_demo(cfg: DemoConfig) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from streams.broker import BrokerError, EmbeddedBroker, port_in_use
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import create_topics
    from streams.feature_repo_tools import materialize_repo
    from streams.kafka_config import KafkaConfig
    from streams.movielens import DataError, load_movielens
    from streams.publisher import publish_kind
    from trm.demo.probes import measure_freshness, measure_rankable, raw_consume_rate
    from trm.demo.report import _json_default, build_report, print_summary, write_markdown

    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log file gets the whole table
    t_start = time.perf_counter()
    out = cfg.out.resolve()
    if cfg.port is not None and port_in_use(cfg.port):
        raise DemoError(f"port {cfg.port} on 127.0.0.1 is taken: free it or run without --port")
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"{out} is not empty: pass a new --out or remove it (the demo never overwrites a run)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir()

    # 1. data
    try:
        ds = load_movielens(cfg.data)
    except DataError as exc:
        raise DemoError(f"data: {exc}") from exc
    cutoff = ds.time_quantile(cfg.cutoff_quantile)
    before, _ = ds.split(cutoff)
    console.print(f"[bold]1/6[/] {cfg.data}: {len(ds.items):,} items, {len(ds.interactions):,} interactions; "
                  f"cutoff {time.strftime('%Y-%m-%d', time.gmtime(cutoff))} (q={cfg.cutoff_quantile})")

    # 2. tokenizer
    tok = fit_tokenizer(cfg, before, cutoff, console)

    # 3. feature store + broker
    console.print("[bold]3/6[/] feast apply → OUT/feature_repo; starting the embedded broker")
    repo = materialize_repo(out / "feature_repo")
    procs = Processes()
    broker = EmbeddedBroker(port=cfg.port, log_path=str(out / "logs" / "broker.log"))
    stop_trainer = threading.Event()
    try:
        try:
            broker.start()
        except BrokerError as exc:
            raise DemoError(str(exc)) from exc
        kafka = KafkaConfig.from_env(bootstrap_servers=broker.bootstrap)
        create_topics(kafka)
        env = dict(os.environ, TRM_KAFKA_BOOTSTRAP=broker.bootstrap, HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        trm_bin = [sys.executable, "-m", "trm.cli"]

        # 4. worker + trainer
        console.print(f"[bold]4/6[/] worker (subprocess) and continuous trainer ({', '.join(cfg.models)})")
        procs.start("worker", trm_bin + ["worker", "--repo", str(repo), "--tokenizer", str(out / "tokenizer")],
                    out / "logs" / "worker.log", env)
        history = [i for i in ds.interactions if i.event_time < cutoff]  # what the warm start learns
        result = _start_trainer(cfg, repo, out, kafka, len(ds.interactions), cutoff, tok, stop_trainer, ds.items,
                                history)

        # 5. replay
        items = sorted((ItemEvent.from_item(it) for it in ds.items.values()), key=lambda e: (e.event_time, e.item_id))
        inters = [InteractionEvent.from_interaction(i) for i in ds.interactions]
        console.print(f"[bold]5/6[/] replaying {len(items):,} item and {len(inters):,} interaction events")
        t_pub = time.perf_counter()
        status_path = repo / "stream_state" / "status.json"
        marks: dict[str, float] = {}
        pub: dict = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                      TimeElapsedColumn(), console=console) as bar:
            b_items = bar.add_task("items tokenized → Feast", total=len(items))
            b_inter = bar.add_task("interactions → Feast", total=len(inters))
            b_warm = bar.add_task("warm start (epochs × rows)", total=0, visible=cfg.warm_epochs > 0)
            b_train = bar.add_task("trainer events", total=len(inters))

            def refresh() -> bool:
                """Update the bars; True once the trainer has consumed everything."""
                procs.check()
                if "error" in result:
                    raise DemoError(f"trainer failed: {result['error']!r}")
                st = _read_status(status_path)
                hi, hn = _handled(st, "items"), _handled(st, "interactions")
                if hi >= len(items):
                    marks.setdefault("items", time.perf_counter())
                if hn >= len(inters) and _handled(st, "item_stats") >= len(inters):
                    marks.setdefault("interactions", time.perf_counter())
                bar.update(b_items, completed=hi)
                bar.update(b_inter, completed=hn)
                if "warm" in result:
                    bar.update(b_warm, completed=result["warm"][0], total=result["warm"][1])
                bar.update(b_train, completed=result["trainer"].state.events_seen)
                return result["done"].is_set()

            def wait(until, what: str) -> None:
                deadline = time.monotonic() + cfg.timeout_s
                while not refresh() and not until():
                    if time.monotonic() > deadline:
                        raise DemoError(f"{what} did not finish in {cfg.timeout_s:.0f} s; see {out}/logs")
                    time.sleep(0.5)

            # The back catalogue and new items go first: a catalogue knows an item before anyone
            # rates it. Interactions then stream while the trainer follows them.
            pub["items"] = publish_kind(kafka, "items", items, progress=False)
            wait(lambda: "items" in marks, "tokenizing the items")
            t_inter = time.perf_counter()
            pub["interactions"] = publish_kind(kafka, "interactions", inters, progress=False)
            wait(lambda: "interactions" in marks, "writing the interactions' features")
            result["features_ready"].set()  # the warm start joins history the worker has written
            wait(lambda: False, "the warm start and the trainer")
            refresh()
        if "error" in result:
            raise DemoError(f"trainer failed: {result['error']!r}")
        t_stream = time.perf_counter() - t_pub

        # 6. measurements and report
        console.print("[bold]6/6[/] freshness probes, raw consumer rate, report")
        fresh = measure_freshness(kafka, repo, max(ds.items) + 1_000_000, cfg.freshness_probes, rate_per_s=20.0)
        rankable = measure_rankable(kafka, repo, out / "trainer" / "models", max(ds.items) + 2_000_000,
                                    cfg.rankable_probes, user_id=ds.interactions[-1].user_id)
        raw = raw_consume_rate(kafka, "interactions", len(inters))
        st = _read_status(status_path)
        tr = result["trainer"]
        report = build_report(cfg, ds, cutoff, tok, tr, st, marks, t_pub, t_inter, t_stream, fresh, raw,
                              pub["items"], pub["interactions"], out, rankable)
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
        write_markdown(report, out / "report.md")
        print_summary(report, console)
        console.print(f"wrote {out}/report.json, report.md, auc_by_item_age.png, prequential_auc.png "
                      f"in {report['wall_s']:.0f} s")
        return report
    finally:
        stop_trainer.set()
        procs.stop_all()
        broker.stop()


def _start_trainer(cfg: DemoConfig, repo: Path, out: Path, kafka, n_events: int, cutoff: int, tok,
                   stop: threading.Event, items: dict, history: list) -> dict:
    """The continuous trainer on a thread of this process: once `features_ready` is set, warm-start
    on `history` (the events before the cutoff), then follow the interactions topic, with the
    Vowpal Wabbit peer (trainer.peers) scored and trained on the same joined rows."""
    from streams.contract.topics import DEFAULT_WORKER_GROUPS
    from trainer.assemble import TokenizerInfo, build_trainer
    from trainer.kafka_source import follow_sync
    from trainer.peers import VWPeer, item_meta_of
    from trainer.pit_join import events_frame
    from trainer.warm_start import WarmStartConfig, warm_start

    result: dict = {"done": threading.Event(), "features_ready": threading.Event()}
    info = TokenizerInfo(tok.num_levels, tok.codebook_size, tok.version, cutoff)
    tr = build_trainer(repo, info, out / "trainer" / "ckpt", list(cfg.models), cfg.trainer or None,
                       dict(threads=1), models_dir=out / "trainer" / "models", publish_every=20,
                       log_path=out / "trainer" / "prequential.jsonl", checkpoint_every=5, keep_predictions=True,
                       peers={"vw": VWPeer(item_meta_of(items))})
    (out / "trainer").mkdir(exist_ok=True)
    result["trainer"] = tr

    def run() -> None:
        try:
            if cfg.warm_epochs > 0:
                while not result["features_ready"].wait(0.5):
                    if stop.is_set():
                        return
                ws = WarmStartConfig(max_epochs=cfg.warm_epochs, seed=0)
                result["warm_start"] = warm_start(
                    tr, events_frame(history), ws,
                    lambda phase, done, total: result.__setitem__("warm", (done, total)) if phase == "epoch" else None)
            t = time.perf_counter()
            result["events"] = follow_sync(tr, kafka, group_id="trm-demo-trainer", batch_size=cfg.batch_size,
                                           max_events=n_events, idle_timeout_s=None, partial_after_s=1e9,
                                           feature_group=DEFAULT_WORKER_GROUPS.interactions, feature_wait_s=cfg.timeout_s)
            result["wall_s"] = time.perf_counter() - t
        except BaseException as exc:  # surfaced by the main thread
            result["error"] = exc
        finally:
            result["done"].set()

    threading.Thread(target=run, name="trm-demo-trainer", daemon=True).start()
    return result
