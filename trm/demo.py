"""`trm demo`: the whole product on one machine with the embedded defaults.

Order of work, each step finished before the next starts unless stated:

1. load the MovieLens-layout data and pick the cutoff (a quantile of the interaction timeline);
2. fit the tokenizer (collaborative alignment included) on items and interactions before it;
3. `feast apply` the feature repo into OUT/feature_repo and start the embedded Tansu broker;
4. start the stream worker (`trm worker`, a subprocess) and the continuous trainer (a thread of
   this process, its own consumer group, gated on the worker's committed offsets so it never
   outruns the features);
5. replay every item and interaction through Kafka in event-time order (items published before
   the cutoff are the back catalogue; later ones are new and tokenized in-stream);
6. when the trainer has consumed every interaction: measure freshness and raw consumer rate,
   score the prequential predictions of events after the cutoff, write report.json, report.md
   and the plots, print the summary table;
7. stop every process it started (also on Ctrl-C or error), by PID.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trm import DEFAULT_DATA_DIR

MODELS = ("trm", "id", "gen_only", "two_gram", "prefix_ngram", "trm_no_ntp")  # last: the NTP ablation


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
    timeout_s: float = 900.0
    trainer: dict = field(default_factory=dict)  # RankerConfig overrides


class DemoError(RuntimeError):
    """A clear, user-facing failure (port taken, malformed data, a part that died)."""


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


def measure_freshness(kafka, repo: Path, next_id: int, n: int, rate_per_s: float) -> list[float]:
    """Publish `n` new items at `rate_per_s`; ms from send to visible in the online store, each."""
    from streams.events import ItemEvent
    from streams.feast_sink import FeastSink
    from streams.publisher import make_producer
    from streams.codec import AvroCodec

    sink, codec, producer = FeastSink(repo), AvroCodec(), make_producer(kafka, linger_ms=0)
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}
    now = int(time.time())
    try:
        for k in range(n):
            iid = next_id + k
            ev = ItemEvent(iid, f"Freshness probe {k}", f"Freshness probe {k}. Genres: Documentary",
                           ["Documentary"], now, now)
            producer.send(kafka.topic("items"), key=str(iid).encode(), value=codec.encode(ev.to_record(), "ItemEvent"))
            producer.flush()
            sent[iid] = time.perf_counter()
            _poll_online(sink, sent, seen)
            time.sleep(1.0 / rate_per_s)
        deadline = time.monotonic() + 30
        while len(seen) < len(sent) and time.monotonic() < deadline:
            _poll_online(sink, sent, seen)
            time.sleep(0.01)
    finally:
        producer.close(timeout=5)
    if len(seen) < len(sent):
        raise DemoError(f"{len(sent) - len(seen)} freshness probes never reached the online store in 30 s")
    return [(seen[i] - sent[i]) * 1000 for i in sent]


def _poll_online(sink, sent: dict[int, float], seen: dict[int, float]) -> None:
    pending = [i for i in sent if i not in seen]
    if not pending:
        return
    rows = sink.read_online("item_tokens", pending, ["tokenizer_version"])
    t = time.perf_counter()
    for i, r in rows.items():
        if r.get("tokenizer_version"):
            seen[i] = t


def raw_consume_rate(kafka, topic: str, n: int) -> float:
    """Messages/s of a bare aiokafka consumer reading `n` messages of `topic` from the start."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    async def run() -> float:
        c = AIOKafkaConsumer(kafka.topic(topic), auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, **kafka.aiokafka_kwargs())
        await c.start()
        try:
            got, t0 = 0, None
            while got < n:
                data = await c.getmany(timeout_ms=1000, max_records=10000)
                if not data:
                    break
                t0 = t0 or time.perf_counter()
                got += sum(len(v) for v in data.values())
            return got / (time.perf_counter() - t0) if t0 else 0.0
        finally:
            await c.stop()

    return asyncio.run(run())


def run_demo(cfg: DemoConfig) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from streams.broker import BrokerError, EmbeddedBroker, create_topics, port_in_use
    from streams.feature_repo_tools import materialize_repo
    from streams.publisher import publish_kind
    from streams.events import InteractionEvent, ItemEvent
    from trm.config import KafkaConfig
    from trm.data import DataError, load_movielens

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
    rep = tok.fit_report

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
        result = _start_trainer(cfg, repo, out, kafka, len(ds.interactions), cutoff, tok, stop_trainer)

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
                if hn >= len(inters):
                    marks.setdefault("interactions", time.perf_counter())
                bar.update(b_items, completed=hi)
                bar.update(b_inter, completed=hn)
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
            wait(lambda: False, "the interaction stream and the trainer")
            refresh()
        if "error" in result:
            raise DemoError(f"trainer failed: {result['error']!r}")
        t_stream = time.perf_counter() - t_pub

        # 6. measurements and report
        console.print("[bold]6/6[/] freshness probes, raw consumer rate, report")
        fresh = measure_freshness(kafka, repo, max(ds.items) + 1_000_000, cfg.freshness_probes, rate_per_s=20.0)
        raw = raw_consume_rate(kafka, "interactions", len(inters))
        st = _read_status(status_path)
        tr = result["trainer"]
        report = build_report(cfg, ds, cutoff, tok, tr, st, marks, t_pub, t_inter, t_stream, fresh, raw,
                              pub["items"], pub["interactions"], out)
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
                   stop: threading.Event) -> dict:
    """The continuous trainer on a thread of this process: follow the interactions topic."""
    from trainer.assemble import TokenizerInfo, build_trainer
    from trainer.continuous import follow_sync

    result: dict = {"done": threading.Event()}
    info = TokenizerInfo(tok.num_levels, tok.codebook_size, tok.version, cutoff)
    tr = build_trainer(repo, info, out / "trainer" / "ckpt", list(cfg.models), cfg.trainer or None,
                       dict(threads=1), models_dir=out / "trainer" / "models", publish_every=20,
                       log_path=out / "trainer" / "prequential.jsonl", checkpoint_every=5, keep_predictions=True)
    (out / "trainer").mkdir(exist_ok=True)
    result["trainer"] = tr

    def run() -> None:
        try:
            t = time.perf_counter()
            result["events"] = follow_sync(tr, kafka, group_id="trm-demo-trainer", batch_size=cfg.batch_size,
                                           max_events=n_events, idle_timeout_s=None,
                                           feature_group="trm-worker-interactions", feature_wait_s=cfg.timeout_s)
            result["wall_s"] = time.perf_counter() - t
        except BaseException as exc:  # surfaced by the main thread
            result["error"] = exc
        finally:
            result["done"].set()

    threading.Thread(target=run, name="trm-demo-trainer", daemon=True).start()
    return result


def build_report(cfg, ds, cutoff, tok, tr, st, marks, t_pub, t_inter, t_stream, fresh, raw, pub_items, pub_inter,
                 out: Path) -> dict:
    import numpy as np

    from trainer.metrics import plot_curves, plot_results, summarize

    preds = tr.prediction_frame()
    preds.to_parquet(out / "trainer" / "predictions.parquet")  # every prequential score, for re-analysis
    after = preds[preds["event_time"] >= cutoff]
    counts = tr.learner.param_counts()
    models, summ = {}, {}
    for name in cfg.models:
        s = summ[name] = summarize(after, f"score_{name}", fit_cutoff=cutoff)
        dense, sparse = counts[name]
        models[name] = {"auc": s["auc"], "gauc": s["gauc"], "logloss": s["logloss"], "n": s["n"],
                        "auc_by_item_age": s["by_age"], "dense_params": dense, "sparse_params": sparse}
    plot_results(summ, str(out / "auc_by_item_age.png"))
    plot_curves(str(out / "trainer" / "prequential.jsonl"), str(out / "prequential_auc.png"))
    items_s = len(ds.items) / (marks["items"] - t_pub) if "items" in marks else None
    inter_s = len(ds.interactions) / (marks["interactions"] - t_inter) if "interactions" in marks else None
    t = tr.timings
    return {
        "data": str(cfg.data), "cutoff": cutoff, "tokenizer_version": tok.version,
        "tokenizer": {k: tok.fit_report.get(k) for k in ("alignment", "rq", "bpe", "timings_s")},
        "models": models,
        "throughput": {
            "encoder_items_per_s": (tok.fit_report.get("encoder") or {}).get("items_per_s"),
            "pipeline_items_per_s": items_s,
            "interactions_per_s": inter_s,
            "raw_consume_per_s": raw,
            "trainer_examples_per_s": tr.state.events_seen / t.total_s if t.total_s else None,
            "trainer_join_share": t.join_s / t.total_s if t.total_s else None,
        },
        "freshness_ms": {"p50": float(np.percentile(fresh, 50)), "p99": float(np.percentile(fresh, 99)),
                         "n": len(fresh)},
        "events": {
            "items_published": pub_items.sent, "interactions_published": pub_inter.sent,
            "items_in_fit": sum(1 for i in ds.items.values() if i.created_at < cutoff),
            "worker": {k: st.get(k) for k in ("items", "interactions")},
            "trainer_events": tr.state.events_seen, "evaluated_events": len(after),
            "trainer_unknown_item_rows": tr.fstats.unknown_item,
        },
        "stream_wall_s": t_stream,
    }


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _f(x, nd=4) -> str:
    return "—" if x is None or (isinstance(x, float) and x != x) else f"{x:.{nd}f}"


def _age_cols(report: dict) -> list[str]:
    first = next(iter(report["models"].values()))
    return list(first["auc_by_item_age"].keys())


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    ages = _age_cols(report)
    head = ["model", "AUC", "GAUC", "logloss", *[f"AUC {a}" for a in ages], "dense", "sparse"]
    rows = []
    for name, m in report["models"].items():
        rows.append([name, _f(m["auc"]), _f(m["gauc"]), _f(m["logloss"]),
                     *[_f((m["auc_by_item_age"].get(a) or {}).get("auc")) for a in ages],
                     f"{m['dense_params']:,}", f"{m['sparse_params']:,}"])
    return head, rows


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    head, rows = summary_rows(report)
    t = Table(title="Prequential quality on events after the cutoff (scored before trained on)")
    for h in head:
        t.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    tp, fr = report["throughput"], report["freshness_ms"]
    console.print(f"encoder {_f(tp['encoder_items_per_s'], 0)} items/s · pipeline {_f(tp['pipeline_items_per_s'], 0)} "
                  f"items/s · interactions {_f(tp['interactions_per_s'], 0)}/s (raw consumer "
                  f"{_f(tp['raw_consume_per_s'], 0)}/s) · trainer {_f(tp['trainer_examples_per_s'], 0)} examples/s · "
                  f"freshness p50 {fr['p50']:.0f} ms, p99 {fr['p99']:.0f} ms")


def write_markdown(report: dict, path: Path) -> None:
    head, rows = summary_rows(report)
    lines = ["# TRM demo report", "",
             f"Data `{report['data']}`, tokenizer `{report['tokenizer_version']}`, cutoff {report['cutoff']} "
             f"({time.strftime('%Y-%m-%d', time.gmtime(report['cutoff']))}).", "",
             "## Prequential quality (events after the cutoff, each scored before it was trained on)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "![AUC by item age](auc_by_item_age.png)", "", "![Prequential AUC](prequential_auc.png)", "",
              "## Throughput and freshness", "", "```json",
              json.dumps({"throughput": report["throughput"], "freshness_ms": report["freshness_ms"],
                          "events": report["events"]}, indent=2, default=_json_default), "```", ""]
    path.write_text("\n".join(lines))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on one machine (embedded broker + Feast)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="MovieLens-layout directory")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory (must be new or empty)")
    p.add_argument("--cutoff-quantile", type=float, default=0.5, help="tokenizer fit cutoff on the timeline")
    p.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of models to train")
    p.add_argument("--batch-size", type=int, default=2048, help="trainer micro-batch (events per PIT join)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--mem-vocab", type=int, default=8192)
    p.add_argument("--freshness-probes", type=int, default=200)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the replay may take")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # ibis/duckdb/faust chatter, not ours
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # and the worker's
    cfg = DemoConfig(data=args.data, out=args.out, cutoff_quantile=args.cutoff_quantile, port=args.port,
                     models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                     batch_size=args.batch_size, levels=args.levels, codebook=args.codebook,
                     mem_vocab=args.mem_vocab, freshness_probes=args.freshness_probes, timeout_s=args.timeout)
    try:
        run_demo(cfg)
    except DemoError as exc:
        print(f"trm demo: {exc}", file=sys.stderr)
        return 2
    return 0
