"""`trm serve` benchmark: /rank latency and throughput over HTTP, next to its two parts measured bare.

Setup: a real Feast repo (SQLite online store) and a published model version. By default a small
world built like tests/test_serve.py's fixture (a synthetic stream, its features written online and
offline, a TRM trained on it and published as v1: 60 items with tokens, 30 users); with
`--demo OUT_DIR` a finished `trm demo`'s OUT_DIR/feature_repo and OUT_DIR/trainer/models (read
only), candidates drawn from the items that have tokens (the offline item_tokens part files list
them) and users from its user_history.

Measured, in one run, for each --token-cache mode (default both: `off`, item tokens from the Feast
online store; `kafka`, from the in-process cache of the item_tokens topic, trainer/serving/
token_cache.py, fed by an embedded Tansu broker that this script fills with the online store's
item_tokens rows of every candidate item) and candidate counts --candidates (default 1, 100, 1000):

  1. service  a real uvicorn server (127.0.0.1, a free port; in a background thread of this process
              by default, `--server process` runs `python -m trm.cli serve` instead, so the load
              generator does not share the server's GIL) driven by a closed-loop load generator:
              --concurrency clients (default 1 and 4), each a thread with one persistent
              http.client connection sending the next request as soon as the last is answered.
              Each cell is bounded by --requests and --max-seconds (whichever comes first), after
              --warmup untimed requests. p50 / p99 latency and requests/s per cell.
  2. read     the bare feature read, no HTTP: trainer.serving.online.OnlineFeatures.read (the rows,
              get_online_features on the ranker FeatureService, the joined frame), or with the
              kafka cache CachedOnlineFeatures.read (the user's and item_stats views from Feast,
              item tokens from the cache).
  3. score    the bare featurize + forward, trainer.evaluate.score on that read's frame with the
              served bundle (trainer.serving.registry.load_bundle of the LATEST version).

2 and 3 run sequentially on the same requests (same users and candidate lists) as the service
cells. The service's overhead is service p50 (1 client) / (read p50 + score p50); the part that
dominates is the largest of read, score and the rest (HTTP, JSON, validation, the response). With
`--server thread` the server-side histograms (trm_serve_feature_read_seconds, _score_seconds) give
each cell's mean read and score inside the service too.

The issue's goal, on 2 cores: p99 <= 25 ms at 100 candidates and overhead <= 1.3x. It is reported as
met or not; this script does not tune anything toward it.

    python bench/serve_bench.py [--demo out/demo3] [--token-cache off,kafka] [--requests 200] [--max-seconds 20]
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOAL_P99_MS, GOAL_OVERHEAD, GOAL_CANDIDATES = 25.0, 1.3, 100
UNKNOWN_BASE = 10_000_000  # candidate ids past every real item: padding when the pool is too small


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ setup
@dataclass
class World:
    repo: Path
    models: Path  # published versions: v<step>/ + LATEST
    items: list[int]  # items with tokens
    users: list[int]
    source: str


def build_world(work: Path, n_events: int = 200, batch: int = 100) -> World:
    """tests/test_serve.py's world: a synthetic stream, its Feast rows (offline + online), a trained TRM, v1."""
    from streams.feast_sink import FeastSink
    from tests.trainer_fixtures import event_stream, feature_rows, featurizer, make_repo, small_config
    from trainer.checkpoint import ModelPublisher
    from trainer.learner import Learner, LearnerConfig
    from trainer.pit_join import FeastJoiner
    from trainer.prequential import ContinuousTrainer, run_events

    events = event_stream(n_events)
    repo = make_repo(work, events)
    sink = FeastSink(repo)
    for view, rows in feature_rows(events).items():
        sink.write(view, rows, offline=False)
    cfg = small_config()
    tr = ContinuousTrainer(Learner(["trm"], cfg, LearnerConfig(minibatch=50)), FeastJoiner(str(repo)), featurizer(cfg),
                           work / "ckpt")
    run_events(tr, events, batch)
    ckpt = sorted((work / "ckpt").glob("ckpt-*"))[-1]
    models = work / "models"
    ModelPublisher(models, every=1).publish(ckpt, 1)
    return World(repo, models, sorted({e.item_id for e in events}), sorted({e.user_id for e in events}),
                 f"synthetic ({n_events} events, tests/test_serve.py's world)")


def _offline_ids(repo: Path, view: str, column: str) -> list[int]:
    import pyarrow.parquet as pq

    ids: set[int] = set()
    for f in sorted((repo / "data" / "offline" / view).glob("*.parquet")):
        ids.update(int(x) for x in pq.read_table(f, columns=[column]).column(column).to_pylist())
    return sorted(ids)


def demo_world(out_dir: Path) -> World:
    repo, models = out_dir / "feature_repo", out_dir / "trainer" / "models"
    for p in (repo / "feature_store.yaml", models / "LATEST"):
        if not p.exists():
            raise SystemExit(f"--demo {out_dir}: {p} is missing (not a finished `trm demo` output)")
    items = _offline_ids(repo, "item_tokens", "item_id")
    users = _offline_ids(repo, "user_history", "user_id")
    if not items or not users:
        raise SystemExit(f"--demo {out_dir}: no item_tokens / user_history part files under {repo}/data/offline")
    return World(repo, models, items, users, f"demo {out_dir}")


def make_requests(world: World, n: int, count: int, seed: int) -> list[tuple[int, list[int]]]:
    """`count` distinct (user, n distinct candidates) requests; real items first, unknown ids pad a small pool."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = np.asarray(world.items, dtype=np.int64)
    out = []
    for _ in range(count):
        user = int(rng.choice(world.users))
        if n <= len(pool):
            items = rng.choice(pool, size=n, replace=False).tolist()
        else:
            items = rng.permutation(pool).tolist() + list(range(UNKNOWN_BASE, UNKNOWN_BASE + n - len(pool)))
        out.append((user, [int(i) for i in items]))
    return out


# ------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_healthy(port: int, timeout: float, alive=lambda: True) -> dict:
    end, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < end:
        if not alive():
            raise SystemExit("the server process exited before it became healthy")
        try:
            st, body = get(port, "/healthz")
            if st == 200:
                return json.loads(body)
            last = f"{st} {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise SystemExit(f"the server did not become healthy in {timeout:.0f} s: {last}")


class ThreadServer:
    """create_app + uvicorn.Server in a daemon thread of this process (as tests/test_serve.py)."""

    def __init__(self, world: World, max_candidates: int, kafka=None, torch_threads: int | None = 1):
        import uvicorn

        from trainer.serving.app import create_app

        self.app = create_app(world.repo, world.models, max_candidates=max_candidates, poll_s=2.0,
                              token_cache=token_cache(kafka), torch_threads=torch_threads)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.health = wait_healthy(self.port, 60)
        cache = self.app.state.token_cache
        if cache is not None and not cache.wait_caught_up(60):
            raise SystemExit(f"the token cache did not catch up: {cache.status()}")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)

    def sample(self, name: str) -> float:
        return self.app.state.metrics.registry.get_sample_value(name) or 0.0


class ProcessServer:
    """`python -m trm.cli serve` in a child process: its own interpreter and GIL."""

    def __init__(self, world: World, max_candidates: int, kafka=None, torch_threads: int | None = 1):
        self.port = free_port()  # (torch_threads: `trm serve`'s own setting, create_app's default)
        self.argv = [sys.executable, "-m", "trm.cli", "serve", "--repo", str(world.repo), "--models", str(world.models),
                     "--host", "127.0.0.1", "--port", str(self.port), "--max-candidates", str(max_candidates),
                     "--log-level", "warning"]
        if kafka is not None:
            self.argv += ["--token-cache", "kafka", "--bootstrap", kafka.bootstrap_servers]
        self.app = None

    def __enter__(self):
        env = {k: v for k, v in os.environ.items() if k != "TRM_FEAST_REPO"}  # it would override --repo
        self.proc = subprocess.Popen(self.argv, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL)
        try:
            self.health = wait_healthy(self.port, 120, alive=lambda: self.proc.poll() is None)
            if "token_cache" in self.health:
                end = time.monotonic() + 60
                while not self.health["token_cache"]["caught_up"]:
                    if time.monotonic() > end:
                        raise SystemExit(f"the token cache did not catch up: {self.health['token_cache']}")
                    time.sleep(0.1)
                    self.health = json.loads(get(self.port, "/healthz")[1])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def sample(self, name: str) -> float:
        return 0.0


# ------------------------------------------------------------------------------ token cache
def fill_item_tokens(config, repo: Path, items: list[int]) -> int:
    """Produce the online store's item_tokens rows of `items` to item_tokens, as the item agent does
    (ItemTokensEvent, keyed by item; streams/item_agent.py), so the cache holds what Feast holds."""
    from feast import FeatureStore

    from streams.contract.codec import AvroCodec
    from streams.contract.events import ItemTokensEvent
    from streams.contract.topics import ITEM_TOKENS
    from streams.publisher import publish_raw

    store = FeatureStore(repo_path=str(repo))
    cols = ("gen_tokens", "mem_tokens", "tokenizer_version", "created_at", "retired")
    have = {f.name for f in store.get_feature_view("item_tokens").features}
    cols += tuple(c for c in ("coarse_tokens", "lexical_tokens") if c in have)  # older demos' repos lack them
    got = store.get_online_features(
        features=[f"item_tokens:{c}" for c in cols], entity_rows=[{"item_id": i} for i in items]).to_dict()
    codec, pairs = AvroCodec(), []
    for j, item in enumerate(items):
        if got["gen_tokens"][j] is None:
            continue
        ev = ItemTokensEvent(item, list(got["gen_tokens"][j]), list(got["mem_tokens"][j] or []),
                             got["tokenizer_version"][j], int(got["created_at"][j]), int(got["created_at"][j]),
                             bool(got["retired"][j]), list((got.get("coarse_tokens") or [None] * len(items))[j] or []),
                             list((got.get("lexical_tokens") or [None] * len(items))[j] or []))
        pairs.append((str(item).encode(), codec.encode(ev.to_record(), "ItemTokensEvent")))
    return publish_raw(config, ITEM_TOKENS, pairs)


def token_cache(kafka):
    """A KafkaTokenCache on `kafka` (a KafkaConfig), or None (mode off)."""
    if kafka is None:
        return None
    from trainer.serving.token_cache import KafkaTokenCache

    return KafkaTokenCache(kafka)


# ------------------------------------------------------------------------------ load
@dataclass
class Cell:
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0
    statuses: dict = field(default_factory=dict)


def run_cell(port: int, requests: list[tuple[int, list[int]]], clients: int, max_requests: int, max_seconds: float,
             warmup: int) -> Cell:
    """Closed loop: `clients` threads, one persistent connection each; stop at max_requests or max_seconds."""
    bodies = [json.dumps({"user_id": u, "item_ids": items}).encode() for u, items in requests]
    headers = {"Content-Type": "application/json"}
    cell, lock = Cell(), threading.Lock()
    issued = [0]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def one(conn: http.client.HTTPConnection, body: bytes) -> int:
        conn.request("POST", "/rank", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for j in range(warmup):  # untimed: connection set up, caches and the threadpool warm
                one(conn, bodies[(k * 7919 + j) % len(bodies)])
            start.wait()
            while True:
                with lock:
                    if issued[0] >= max_requests or time.perf_counter() >= deadline[0]:
                        return
                    i = issued[0]
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    st = one(conn, bodies[i % len(bodies)])
                except (OSError, http.client.HTTPException):
                    st = "conn_error"
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                dt = time.perf_counter() - t0
                with lock:
                    cell.statuses[str(st)] = cell.statuses.get(str(st), 0) + 1
                    if st == 200:
                        cell.latencies.append(dt)
                    else:
                        cell.errors += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + max_seconds + 3600  # set for real once every client is warm
    start.wait()
    t0 = time.perf_counter()
    deadline[0] = t0 + max_seconds
    for t in threads:
        t.join(max_seconds + 120)
    cell.wall_s = time.perf_counter() - t0
    return cell


def bare(world: World, bundle, requests, max_requests: int, max_seconds: float, warmup: int, cache=None) -> dict:
    """The feature read, then trainer.evaluate.score on its frame, per request, sequentially (no HTTP).

    `cache`: a started, caught-up KafkaTokenCache (CachedOnlineFeatures), or None (OnlineFeatures)."""
    import torch

    from trainer.evaluate import score
    from trainer.serving.online import CachedOnlineFeatures, OnlineFeatures

    online = OnlineFeatures(str(world.repo)) if cache is None else CachedOnlineFeatures(str(world.repo), cache)
    online.open()
    read_s, store_s, score_s = [], [], []
    end = None
    for j in range(warmup + max_requests):
        if j == warmup:
            end = time.perf_counter() + max_seconds
        if end is not None and time.perf_counter() >= end:
            break
        u, items = requests[j % len(requests)]
        t0 = time.perf_counter()
        got = online.read(u, items, int(time.time()))
        t1 = time.perf_counter()
        with torch.inference_mode():  # as the app scores (trainer/serving/app.py)
            scored = score(bundle.models, got.frame, bundle.featurizer)
        t2 = time.perf_counter()
        assert len(scored) == len(items)
        if j >= warmup:
            read_s.append(t1 - t0)
            store_s.append(got.seconds)
            score_s.append(t2 - t1)
    return {"read": read_s, "store": store_s, "score": score_s}


def pct(xs, q) -> float:
    import numpy as np

    return float(np.percentile(xs, q) * 1e3) if len(xs) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=None, metavar="OUT_DIR",
                    help="a finished demo's output (OUT_DIR/feature_repo, OUT_DIR/trainer/models); "
                         "default: build tests/test_serve.py's small world in --work")
    ap.add_argument("--candidates", default="1,100,1000", help="comma list of candidate counts per request")
    ap.add_argument("--concurrency", default="1,4", help="comma list of concurrent clients")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per cell, at most")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="seconds per cell, at most")
    ap.add_argument("--warmup", type=int, default=5, help="untimed requests per client (and per bare run)")
    ap.add_argument("--distinct", type=int, default=64, help="distinct requests per candidate count (cycled)")
    ap.add_argument("--token-cache", default="off,kafka",
                    help="comma list of token-cache modes to measure: off (Feast), kafka (the item_tokens cache)")
    ap.add_argument("--server", choices=("thread", "process"), default="thread",
                    help="uvicorn in a thread of this process (as the tests) or `trm serve` as a child process")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="--server thread: create_app's torch_threads (0: leave torch's default, one per core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "out" / "serve_bench"))
    ap.add_argument("--work", default=None, help="work dir for the synthetic world (default: a temp dir)")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.candidates.split(",")]
    cs = [int(x) for x in args.concurrency.split(",")]
    logging.basicConfig(level=logging.WARNING)
    from trm import quiet_third_party_warnings

    quiet_third_party_warnings()

    import torch
    from rich.console import Console
    from rich.table import Table

    from trainer.checkpoint import read_pointer
    from trainer.serving.registry import load_bundle

    console = Console(width=180)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_setup = time.perf_counter()
    if args.demo:
        world = demo_world(Path(args.demo))
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="serve-bench-"))
        world = build_world(work)
    version = read_pointer(world.models)
    bundle = load_bundle(version, "trm")
    log(f"{world.source}: {len(world.items):,} items with tokens, {len(world.users):,} users, "
        f"serving {bundle.version} ({bundle.model_name}, step {bundle.step}); setup {time.perf_counter() - t_setup:.1f} s")
    reqs = {n: make_requests(world, n, args.distinct, args.seed + n) for n in ns}

    modes = [m for m in args.token_cache.split(",") if m]
    if not modes or set(modes) - {"off", "kafka"}:
        raise SystemExit(f"--token-cache {args.token_cache!r}: a comma list of off, kafka")
    broker = kafka = None
    if "kafka" in modes:  # an embedded broker whose item_tokens topic holds what the online store holds
        from streams.broker import EmbeddedBroker
        from streams.contract.topics import create_topics
        from streams.kafka_config import KafkaConfig

        broker = EmbeddedBroker().start()
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap)
        create_topics(kafka)
        log(f"token cache: {fill_item_tokens(kafka, world.repo, world.items):,} item_tokens records on {broker.bootstrap}")
    try:
        cells, parts, summary = {}, {}, {}
        for mode in modes:
            c_, p_, s_ = measure(world, bundle, reqs, ns, cs, args, kafka if mode == "kafka" else None, mode)
            cells.update({(mode, *k): v for k, v in c_.items()})
            parts.update({(mode, n): v for n, v in p_.items()})
            summary.update({(mode, n): v for n, v in s_.items()})
    finally:
        if broker is not None:
            broker.stop()

    # tables
    tab = Table(title=f"trm serve over HTTP ({args.server} server, {bundle.version}; {world.source}; "
                      f"<= {args.requests} requests / {args.max_seconds:g} s per cell; "
                      f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs)")
    for col in ("token cache", "candidates", "clients", "requests", "errors", "p50 ms", "p99 ms", "req/s",
                "in-service read ms", "in-service score ms"):
        tab.add_column(col, justify="right")
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for (mode, n, c), r in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], modes.index(kv[0][0]))):
        tab.add_row(mode, f"{n:,}", str(c), f"{r['requests']:,}", str(r["errors"]), f(r["p50_ms"]), f(r["p99_ms"]),
                    f(r["rps"]), f(r["inside_read_mean_ms"]), f(r["inside_score_mean_ms"]))
    console.print(tab)
    tab2 = Table(title="The same requests without HTTP (sequential) and the service's overhead "
                       "= service p50 (1 client) / (read p50 + score p50)")
    for col in ("token cache", "candidates", "requests", "read p50", "read p99", "(store calls p50)", "score p50",
                "score p99", "read+score p50", "service p50", "overhead", "HTTP + rest p50", "dominant"):
        tab2.add_column(col, justify="right")
    for n in ns:
        for mode in modes:
            p, s = parts[mode, n], summary[mode, n]
            tab2.add_row(mode, f"{n:,}", f"{p['requests']:,}", f(p["read_p50_ms"]), f(p["read_p99_ms"]),
                         f(p["store_p50_ms"]), f(p["score_p50_ms"]), f(p["score_p99_ms"]), f(s["bare_p50_ms"]),
                         f(s["service_p50_ms"]), f"{s['overhead']:.2f}x", f(s["rest_ms"]), s["dominant"])
    console.print(tab2)

    goal = {}
    if GOAL_CANDIDATES in ns and 1 in cs:
        verdict = lambda ok: "[green]met[/green]" if ok else "[red]NOT met[/red]"  # noqa: E731
        for mode in modes:
            c1 = cells[mode, GOAL_CANDIDATES, 1]
            ov = summary[mode, GOAL_CANDIDATES]["overhead"]
            goal[mode] = {"p99_ms": c1["p99_ms"], "p99_goal_ms": GOAL_P99_MS, "p99_met": c1["p99_ms"] <= GOAL_P99_MS,
                          "overhead": ov, "overhead_goal": GOAL_OVERHEAD, "overhead_met": ov <= GOAL_OVERHEAD,
                          "p99_ms_by_clients": {c: cells[mode, GOAL_CANDIDATES, c]["p99_ms"] for c in cs}}
            console.print(f"token cache {mode}: goal at {GOAL_CANDIDATES} candidates, 1 client: p99 "
                          f"{c1['p99_ms']:.1f} ms (<= {GOAL_P99_MS:g}) {verdict(goal[mode]['p99_met'])}; overhead "
                          f"{ov:.2f}x (<= {GOAL_OVERHEAD}) {verdict(goal[mode]['overhead_met'])}" + "".join(
                              f"; p99 with {c} clients {cells[mode, GOAL_CANDIDATES, c]['p99_ms']:.1f} ms"
                              for c in cs if c != 1))
    for mode in modes:
        console.print(f"token cache {mode}: dominant part of a 1-client request: " + ", ".join(
            f"{n:,} candidates: {summary[mode, n]['dominant']}" for n in ns))

    key = lambda k: "_".join(str(x) for x in k)  # noqa: E731
    figures = {
        "source": world.source, "server": args.server, "model_version": bundle.version, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "token_cache_modes": modes,
        "service": list(cells.values()), "bare": {key(k): v for k, v in parts.items()},
        "summary": {key(k): v for k, v in summary.items()}, "goal": goal, "args": vars(args)}
    (out / "serve_bench.json").write_text(json.dumps(figures, indent=1, default=str))
    log(f"wrote {out}/serve_bench.json")
    print(json.dumps({
        "source": world.source, "server": args.server,
        "cells": {f"{r['token_cache']}_n{r['candidates']}_c{r['clients']}": {
            "p50_ms": round(r["p50_ms"], 2), "p99_ms": round(r["p99_ms"], 2), "rps": round(r["rps"], 1),
            "requests": r["requests"], "errors": r["errors"]} for r in cells.values()},
        "bare": {key(k): {"read_p50_ms": round(v["read_p50_ms"], 2), "score_p50_ms": round(v["score_p50_ms"], 2)}
                 for k, v in parts.items()},
        "overhead": {key(k): round(v["overhead"], 3) for k, v in summary.items()},
        "dominant": {key(k): v["dominant"] for k, v in summary.items()},
        "goal": {m: {k: g[k] for k in ("p99_ms", "p99_met", "overhead", "overhead_met")} for m, g in goal.items()}},
        default=str))
    return 0


def measure(world: World, bundle, reqs: dict, ns: list[int], cs: list[int], args, kafka, mode: str):
    """One token-cache mode: the service cells (n, clients), then the bare read and score per n, then
    which part dominates a 1-client request. `kafka`: the broker's KafkaConfig (mode kafka) or None."""
    # 1. the service
    cells: dict[tuple[int, int], dict] = {}
    Server = ThreadServer if args.server == "thread" else ProcessServer
    with Server(world, max(ns), kafka, args.torch_threads or None) as srv:
        if srv.health["model_version"] != bundle.version:
            raise SystemExit(f"the server serves {srv.health['model_version']}, the bare path {bundle.version}")
        for n in ns:
            for c in cs:
                names = ("trm_serve_feature_read_seconds", "trm_serve_score_seconds")
                before = {k: (srv.sample(f"{k}_sum"), srv.sample(f"{k}_count")) for k in names}
                cell = run_cell(srv.port, reqs[n], c, args.requests, args.max_seconds, args.warmup)
                inside = {}
                for k in names:  # includes the warmup requests of this cell (a mean, for cross-checking)
                    s, cnt = srv.sample(f"{k}_sum") - before[k][0], srv.sample(f"{k}_count") - before[k][1]
                    inside[k] = s / cnt * 1e3 if cnt else None
                lat = cell.latencies
                cells[n, c] = {"token_cache": mode, "candidates": n, "clients": c, "requests": len(lat),
                               "errors": cell.errors, "statuses": cell.statuses, "wall_s": cell.wall_s,
                               "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                               "mean_ms": sum(lat) / len(lat) * 1e3 if lat else float("nan"),
                               "rps": len(lat) / cell.wall_s if cell.wall_s else float("nan"),
                               "inside_read_mean_ms": inside[names[0]], "inside_score_mean_ms": inside[names[1]]}
                log(f"[{mode}] service n={n} c={c}: {len(lat)} requests in {cell.wall_s:.1f} s, "
                    f"p50 {cells[n, c]['p50_ms']:.1f} ms, p99 {cells[n, c]['p99_ms']:.1f} ms, errors {cell.errors}")

    # 2 + 3. the bare parts, the same requests, no HTTP (the server is stopped: nothing else runs)
    cache = token_cache(kafka)
    if cache is not None:
        cache.start()
        if not cache.wait_caught_up(60):
            raise SystemExit(f"the token cache did not catch up: {cache.status()}")
    parts: dict[int, dict] = {}
    try:
        for n in ns:
            b = bare(world, bundle, reqs[n], args.requests, args.max_seconds, args.warmup, cache)
            parts[n] = {"requests": len(b["read"]), "read_p50_ms": pct(b["read"], 50),
                        "read_p99_ms": pct(b["read"], 99), "store_p50_ms": pct(b["store"], 50),
                        "score_p50_ms": pct(b["score"], 50), "score_p99_ms": pct(b["score"], 99)}
            log(f"[{mode}] bare n={n}: read p50 {parts[n]['read_p50_ms']:.1f} ms, "
                f"score p50 {parts[n]['score_p50_ms']:.1f} ms")
    finally:
        if cache is not None:
            cache.stop()

    summary: dict[int, dict] = {}
    for n in ns:
        p = parts[n]
        bare_p50 = p["read_p50_ms"] + p["score_p50_ms"]
        svc = cells.get((n, 1)) or cells[n, min(cs)]
        rest = svc["p50_ms"] - bare_p50
        shares = {"feature read": p["read_p50_ms"], "featurize + forward": p["score_p50_ms"], "HTTP + rest": rest}
        summary[n] = {"bare_p50_ms": bare_p50, "service_p50_ms": svc["p50_ms"], "service_clients": svc["clients"],
                      "overhead": svc["p50_ms"] / bare_p50 if bare_p50 else float("nan"),
                      "rest_ms": rest, "dominant": max(shares, key=shares.get)}
    return cells, parts, summary

if __name__ == "__main__":
    sys.exit(main())
