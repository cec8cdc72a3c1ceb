"""Soak: a bounded-time steady load on one `trm worker`, memory and consumer lag sampled.

Real parts, as in bench/streams_bench.py: an embedded Tansu broker, a Feast repo (SQLite online,
parquet-part offline) in a temp dir, a tokenizer (a small one fitted here, or --tokenizer), and
`trm worker` as a subprocess (exactly what the fault tests start). A publisher thread sends
synthetic interactions at a steady rate (users uniform, items skewed to a popular head, labels
Bernoulli), stamped with an event time that advances steadily like a real stream, compressed
(--time-scale event seconds per wall second; the default makes a 10-minute run span two of the
worker's 7-day allowed-lateness horizons, beyond which it compacts its state); new items keep arriving at --new-item-rate so the item agent and the tokenizer
stay exercised, and interactions on them start a few seconds after they are published.

Every --interval seconds it samples: worker RSS and CPU (the process and its children, psutil),
consumer lag per agent (log end offset - committed offset of the worker's groups
trm-worker-items / trm-worker-interactions; the end offsets are the publisher's acknowledged
offsets, because Tansu's ListOffsets is unreliable), events processed (the worker's
status.json), the state dir and Feast offline sizes on disk, the broker's RSS. After --duration
the publisher stops and the worker gets --drain-timeout seconds to catch up.

Prints a table and a summary (RSS at 10 % of the run vs at the end, RSS slope over the second
half, max/p95/final lag, drained or not) and writes soak.json, soak.csv and soak.png to --out.
Exit code 1 if the worker died (or a publish failed).

    python bench/soak.py [--duration 600] [--rate 2000] [--users 5000] [--items 2000] [--out out/soak]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT / "data" / "ml-latest-small"
APP_ID = "trm-worker"  # streams.app.WorkerSettings.app_id: groups are f"{app_id}-items" / f"{app_id}-interactions"
LATENESS_S = 7 * 86_400  # streams.app.WorkerSettings.allowed_lateness_s (`trm worker` default)
FRESH_ID_BASE = 20_000_000  # ids of synthetic new items once MovieLens runs out

from streams_bench import get_tokenizer, log  # noqa: E402  (shared with the streams benchmark)


# ---------------------------------------------------------------- synthetic steady stream
class EventSource:
    """Steady synthetic events over a catalogue that keeps growing.

    Items: the first `n_items` MovieLens items are the starting catalogue; new items come from the
    rest of MovieLens, then synthetic re-releases (new id, same text + an edition number). An item
    becomes eligible for interactions `fresh_delay` seconds after it was published.
    Interactions: user uniform in 1..users; item with probability `fresh_share` among the 50
    newest eligible items, else skewed to the head of the catalogue (index = n * u**3).
    """

    def __init__(self, items: list, n_items: int, users: int, label_rate: float, fresh_share: float,
                 fresh_delay: float, seed: int = 0):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.catalogue = items[:n_items]
        self.spare = deque(items[n_items:])
        self.all_items = items
        self.users = users
        self.label_rate = label_rate
        self.fresh_share = fresh_share
        self.fresh_delay = fresh_delay
        self.eligible: list[int] = [it.item_id for it in self.catalogue]
        self.recent: deque[int] = deque(maxlen=50)
        self.pending: deque[tuple[float, int]] = deque()  # (eligible at, item id)
        self.n_new = 0
        self._rid = 0

    def catalogue_events(self, event_time: int) -> list:
        from streams.contract.events import ItemEvent

        return [ItemEvent(it.item_id, it.title, it.text(), list(it.genres), event_time, event_time)
                for it in self.catalogue]

    def new_item(self, event_time: int, now: float):
        from streams.contract.events import ItemEvent

        self.n_new += 1
        if self.spare:
            it = self.spare.popleft()
            ev = ItemEvent(it.item_id, it.title, it.text(), list(it.genres), event_time, event_time)
        else:
            it = self.all_items[self.n_new % len(self.all_items)]
            iid = FRESH_ID_BASE + self.n_new
            ev = ItemEvent(iid, f"{it.title} (edition {self.n_new})", f"{it.text()}. Edition {self.n_new}",
                           list(it.genres), event_time, event_time)
        self.pending.append((now + self.fresh_delay, ev.item_id))
        return ev

    def interactions(self, n: int, event_time: int, now: float) -> list:
        from streams.contract.events import InteractionEvent

        while self.pending and self.pending[0][0] <= now:
            iid = self.pending.popleft()[1]
            self.eligible.append(iid)
            self.recent.append(iid)
        users = self.rng.integers(1, self.users + 1, n)
        labels = self.rng.random(n) < self.label_rate
        head = (len(self.eligible) * self.rng.random(n) ** 3).astype(int)
        fresh = self.rng.random(n) < self.fresh_share if self.recent else [False] * n
        pick = self.rng.integers(0, max(1, len(self.recent)), n)
        out = []
        for k in range(n):
            iid = self.recent[pick[k]] if fresh[k] else self.eligible[head[k]]
            self._rid += 1
            out.append(InteractionEvent(f"soak-{self._rid}", int(users[k]), iid, int(labels[k]), event_time))
        return out


class SteadyPublisher(threading.Thread):
    """Sends interactions at `rate`/s and new items at `item_rate`/s, paced on the monotonic clock
    in 20 ms ticks. Tracks the acknowledged end offset of every partition (the lag's log end)."""

    def __init__(self, cfg, source: EventSource, rate: float, item_rate: float, time_scale: float):
        super().__init__(name="soak-publisher", daemon=True)
        from streams.contract.codec import AvroCodec
        from streams.publisher import make_producer

        self.cfg = cfg
        self.source = source
        self.rate = rate
        self.item_rate = item_rate
        self.time_scale = time_scale
        self.codec = AvroCodec()
        self.producer = make_producer(cfg, client_id="trm-soak")
        self.leo: dict[tuple[str, int], int] = {}
        self.sent = {"items": 0, "interactions": 0}
        self.behind = 0  # most events the publisher was ever behind its schedule
        self.errors: list[str] = []
        self.base = time.time()
        self.t0 = time.monotonic()
        self.sent_at_start = dict(self.sent)
        self._halt = threading.Event()

    def event_time(self, now: float | None = None) -> int:
        return int(self.base + ((now or time.monotonic()) - self.t0) * self.time_scale)

    def _ack(self, md) -> None:
        k = (md.topic, md.partition)
        if md.offset + 1 > self.leo.get(k, 0):
            self.leo[k] = md.offset + 1

    def _err(self, exc) -> None:
        self.errors.append(repr(exc))

    def send(self, kind: str, ev) -> None:
        if kind == "items":
            key, name = ev.item_id, "ItemEvent"
        else:
            key, name = ev.user_id, "InteractionEvent"
        fut = self.producer.send(self.cfg.topic(kind), key=str(key).encode(),
                                 value=self.codec.encode(ev.to_record(), name))
        fut.add_callback(self._ack)
        fut.add_errback(self._err)
        self.sent[kind] += 1

    def publish_catalogue(self) -> int:
        evs = self.source.catalogue_events(self.event_time() - 60)
        for ev in evs:
            self.send("items", ev)
        self.producer.flush()
        return len(evs)

    def end_offsets(self, kind: str) -> dict[int, int]:
        t = self.cfg.topic(kind)
        return {p: off for (topic, p), off in list(self.leo.items()) if topic == t}

    def run(self) -> None:
        self.t0 = time.monotonic()
        self.base = time.time()
        self.sent_at_start = dict(self.sent)
        n_int = n_items = 0
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                el = now - self.t0
                et = self.event_time(now)
                due_items = int(self.item_rate * el) - n_items
                for _ in range(max(0, due_items)):
                    self.send("items", self.source.new_item(et, now))
                    n_items += 1
                due = int(self.rate * el) - n_int
                self.behind = max(self.behind, due)
                if due > 0:
                    for ev in self.source.interactions(min(due, int(self.rate) + 1), et, now):
                        self.send("interactions", ev)
                    n_int += min(due, int(self.rate) + 1)
                time.sleep(max(0.0, 0.02 - (time.monotonic() - now)))
            self.producer.flush()
        except Exception as exc:  # reported; the main loop ends the run
            self.errors.append(repr(exc))

    def stop(self) -> None:
        self._halt.set()

    def close(self) -> None:
        try:
            self.producer.close(timeout=10)
        except Exception:
            pass


# ---------------------------------------------------------------- probes
class LagProbe:
    """Committed offsets of the worker's consumer groups (one idle kafka-python consumer per group:
    it fetches offsets by partition and never joins the group)."""

    def __init__(self, cfg, partitions: dict[str, int]):
        from kafka import KafkaConsumer, TopicPartition

        self.cfg = cfg
        self.tps = {k: [TopicPartition(cfg.topic(k), p) for p in range(n)] for k, n in partitions.items()}
        self.consumers = {k: KafkaConsumer(**cfg.kafka_python_kwargs(), group_id=f"{APP_ID}-{k}",
                                           enable_auto_commit=False, client_id=f"trm-soak-lag-{k}")
                          for k in partitions}

    def committed(self, kind: str) -> dict[int, int]:
        c = self.consumers[kind]
        return {tp.partition: c.committed(tp) or 0 for tp in self.tps[kind]}

    def lag(self, kind: str, ends: dict[int, int]) -> tuple[int, int, int]:
        """(lag, end, committed) summed over partitions; a partition's lag is never below 0 (the
        acked end can trail the real end by the sends still in flight)."""
        com = self.committed(kind)
        lag = sum(max(0, ends.get(p, 0) - com.get(p, 0)) for p in com)
        return lag, sum(ends.values()), sum(com.values())

    def close(self) -> None:
        for c in self.consumers.values():
            c.close()


class ProcTree:
    """RSS and CPU of a process and all its children (psutil)."""

    def __init__(self, pid: int):
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process(pid)
        self.last = (time.monotonic(), self._cpu())

    def _procs(self):
        try:
            return [self.proc] + self.proc.children(recursive=True)
        except self.psutil.Error:
            return []

    def _cpu(self) -> float:
        tot = 0.0
        for p in self._procs():
            try:
                t = p.cpu_times()
                tot += t.user + t.system
            except self.psutil.Error:
                pass
        return tot

    def sample(self) -> tuple[float, float, int]:
        """(RSS MB, CPU % of one core since the last sample, number of processes)."""
        procs = self._procs()
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except self.psutil.Error:
                pass
        now, cpu = time.monotonic(), self._cpu()
        pct = 100.0 * (cpu - self.last[1]) / max(1e-6, now - self.last[0])
        self.last = (now, cpu)
        return rss / 2**20, pct, len(procs)


def du(path: Path) -> tuple[int, int]:
    """(bytes, files) under path."""
    total = files = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                            files += 1
                    except FileNotFoundError:  # a temp part renamed under us
                        pass
        except FileNotFoundError:
            pass
    return total, files


def detail_rows(state_dir: Path, table: str) -> int | None:
    """Rows of a per-partition state table (`item_events`, `user_events`): the detail the worker
    also holds in memory (streams/state/); None where the table does not exist."""
    n = None
    for f in state_dir.glob("*.sqlite"):
        try:
            db = sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=1)
            try:
                n = (n or 0) + db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            pass
    return n


def code_version() -> str:
    """The commit the worker runs, and whether streams/ differs from it (a shared checkout moves)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "streams", "trm"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' + uncommitted changes in streams/ or trm/' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_status(repo: Path) -> dict:
    try:
        return json.loads((repo / "stream_state" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def start_worker(env: dict, repo: Path, tokenizer: Path, log_path: Path) -> subprocess.Popen:
    """`trm worker` as a subprocess, as tests/test_faults_worker_crash.py starts it."""
    with open(log_path, "ab") as logf:
        return subprocess.Popen([sys.executable, "-W", "ignore", "-m", "trm.cli", "worker", "--repo", str(repo),
                                 "--tokenizer", str(tokenizer)], cwd=ROOT, env=env, stdout=logf,
                                stderr=subprocess.STDOUT)


def stop_worker(w: subprocess.Popen) -> int | None:
    if w.poll() is None:
        w.send_signal(signal.SIGTERM)
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(timeout=10)
    return w.returncode


# ---------------------------------------------------------------- the run
def sample_row(t: float, phase: str, tree: ProcTree, broker_tree: ProcTree | None, lag: LagProbe,
               pub: SteadyPublisher, repo: Path, prev: dict | None, count_rows: bool) -> dict:
    rss, cpu, nproc = tree.sample()
    b_rss = broker_tree.sample()[0] if broker_tree else float("nan")
    li, li_end, li_com = lag.lag("interactions", pub.end_offsets("interactions"))
    lt, lt_end, lt_com = lag.lag("items", pub.end_offsets("items"))
    st = read_status(repo)
    si, sit = st.get("interactions", {}), st.get("items", {})
    state_b, _ = du(repo / "stream_state")
    off_b, off_f = du(repo / "data" / "offline")
    pairs_b, pairs_f = du(repo / "data" / "pairs")
    online = repo / "data" / "online.db"
    row = {
        "t_s": round(t, 1), "phase": phase, "worker_rss_mb": round(rss, 1), "worker_cpu_pct": round(cpu, 1),
        "worker_procs": nproc, "broker_rss_mb": round(b_rss, 1),
        "lag_interactions": li, "lag_items": lt, "end_interactions": li_end, "committed_interactions": li_com,
        "end_items": lt_end, "committed_items": lt_com,
        "published_interactions": pub.sent["interactions"], "published_items": pub.sent["items"],
        "processed_interactions": si.get("processed", 0), "processed_items": sit.get("processed", 0),
        "parked": si.get("parked", 0), "dead_lettered": si.get("dead_lettered", 0) + sit.get("dead_lettered", 0),
        "batches_interactions": si.get("batches", 0),
        "state_mb": round(state_b / 2**20, 2), "offline_mb": round(off_b / 2**20, 2), "offline_files": off_f,
        "pairs_mb": round(pairs_b / 2**20, 2), "pairs_files": pairs_f,
        "online_mb": round((online.stat().st_size if online.exists() else 0) / 2**20, 2),
        "item_event_rows": detail_rows(repo / "stream_state", "item_events") if count_rows else None,
        "user_event_rows": detail_rows(repo / "stream_state", "user_events") if count_rows else None,
    }
    if prev is not None and t > prev["t_s"]:
        row["interactions_per_s"] = round((row["processed_interactions"] - prev["processed_interactions"])
                                          / (t - prev["t_s"]), 1)
    else:
        row["interactions_per_s"] = None
    return row


def progress_line(r: dict, duration: float) -> str:
    eps = f"{r['interactions_per_s']:,.0f}/s" if r["interactions_per_s"] is not None else "-"
    return (f"[{r['t_s']:6.0f}s/{duration:.0f}s {r['phase']:<5}] rss {r['worker_rss_mb']:7.1f} MB  "
            f"cpu {r['worker_cpu_pct']:5.1f}%  lag int {r['lag_interactions']:>7,} items {r['lag_items']:>4,}  "
            f"done {r['processed_interactions']:>10,} ({eps})  items {r['processed_items']:,}  "
            f"parked {r['parked']:,}  state {r['state_mb']:.1f} MB  offline {r['offline_mb']:.1f} MB")


def soak(args, work: Path, out: Path) -> tuple[int, dict, list[dict]]:
    from streams.broker import EmbeddedBroker
    from streams.contract.topics import create_topics, topic_plan
    from streams.feature_repo_tools import materialize_repo
    from streams.kafka_config import KafkaConfig
    from streams.movielens import load_movielens

    meta: dict = {"cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "code": code_version()}
    rows: list[dict] = []
    rc = 0
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig.from_env(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
        create_topics(cfg)
        repo = materialize_repo(work / "repo")
        tok = get_tokenizer(args, work)
        log(f"broker {broker.bootstrap}, feast repo {repo}, tokenizer {tok}")
        ds = load_movielens(DATA)
        items = sorted(ds.items.values(), key=lambda i: i.item_id)
        source = EventSource(items, min(args.items, len(items)), args.users, args.label_rate, args.fresh_share,
                             args.fresh_delay, seed=args.seed)
        env = dict(os.environ, TRM_KAFKA_BOOTSTRAP=broker.bootstrap, TRM_KAFKA_SESSION_TIMEOUT_MS="6000",
                   HF_HUB_OFFLINE="1", TRM_TOPIC_PREFIX=cfg.topic_prefix)
        log_path = out / "worker.log"
        log_path.unlink(missing_ok=True)
        pub = lag = None
        t_start = time.monotonic()
        worker = start_worker(env, repo, tok, log_path)
        meta["worker_pid"] = worker.pid
        try:
            tree = ProcTree(worker.pid)
            broker_tree = ProcTree(broker.proc.pid) if broker.proc else None
            pub = SteadyPublisher(cfg, source, args.rate, args.new_item_rate, args.time_scale)
            lag = LagProbe(cfg, {k: topic_plan()[k] for k in ("items", "interactions")})
            n_cat = pub.publish_catalogue()
            log(f"worker pid {worker.pid}; published a starting catalogue of {n_cat:,} items; waiting for its tokens")
            deadline = time.monotonic() + args.warmup_timeout
            while read_status(repo).get("items", {}).get("processed", 0) < n_cat:
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {worker.returncode} during warm-up")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"catalogue not tokenized after {args.warmup_timeout:.0f} s: "
                                       f"{read_status(repo)}")
                time.sleep(0.5)
            meta["warmup_s"] = round(time.monotonic() - t_start, 1)
            meta["rss_after_warmup_mb"] = round(tree.sample()[0], 1)
            log(f"warm-up {meta['warmup_s']} s (worker start + catalogue tokenized), worker RSS "
                f"{meta['rss_after_warmup_mb']} MB; steady load: {args.rate:,.0f} interactions/s, "
                f"{args.new_item_rate:g} new items/s for {args.duration:.0f} s")
            pub.start()
            t0 = time.monotonic()
            prev = None
            k = 0
            phase = "load"
            drain_deadline = None
            meta["drained"] = False
            while True:
                k += 1
                next_at = t0 + k * args.interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                t = time.monotonic() - t0
                if phase == "load" and t >= args.duration - 1e-6:
                    pub.stop()
                    pub.join(timeout=30)
                    phase = "drain"
                    drain_deadline = time.monotonic() + args.drain_timeout
                    meta["published_interactions"] = pub.sent["interactions"] - pub.sent_at_start["interactions"]
                    meta["published_new_items"] = pub.sent["items"] - pub.sent_at_start["items"]
                    meta["publish_seconds"] = round(t, 1)
                    meta["publisher_max_behind"] = pub.behind
                row = sample_row(t, phase, tree, broker_tree, lag, pub, repo, prev,
                                 count_rows=args.count_item_events)
                rows.append(row)
                prev = row
                print(progress_line(row, args.duration), flush=True)
                if worker.poll() is not None:
                    log(f"worker DIED with exit code {worker.returncode}; see {log_path}")
                    meta["worker_died"] = worker.returncode
                    rc = 1
                    break
                if pub.errors:
                    log(f"publish errors: {pub.errors[:3]}")
                    meta["publish_errors"] = pub.errors[:10]
                    rc = 1
                    break
                if phase == "drain":
                    if row["lag_interactions"] == 0 and row["lag_items"] == 0 and row["parked"] == 0:
                        meta["drained"] = True
                        meta["drain_s"] = round(t - args.duration, 1)
                        break
                    if time.monotonic() > drain_deadline:
                        break
        finally:
            try:
                if pub is not None:
                    pub.stop()
                    if pub.is_alive():
                        pub.join(timeout=30)
                    pub.close()
                if lag is not None:
                    lag.close()
            finally:
                code = stop_worker(worker)  # always, by PID
            meta.setdefault("worker_exit_code", code)
            meta["loadavg_end"] = os.getloadavg()
            meta["wall_s"] = round(time.monotonic() - t_start, 1)
    return rc, meta, rows


# ---------------------------------------------------------------- report
def summarize(args, meta: dict, rows: list[dict]) -> dict:
    import numpy as np

    load = [r for r in rows if r["phase"] == "load"] or rows
    s: dict = {k: meta.get(k) for k in ("warmup_s", "rss_after_warmup_mb", "drained", "drain_s",
                                        "published_interactions", "published_new_items", "publish_seconds",
                                        "publisher_max_behind", "worker_exit_code", "worker_died")}
    if not load:
        return s
    t = np.array([r["t_s"] for r in load])
    rss = np.array([r["worker_rss_mb"] for r in load])
    i10 = int(np.argmin(np.abs(t - 0.1 * args.duration)))
    s["rss_at_10pct_mb"] = float(rss[i10])
    s["rss_at_10pct_t_s"] = float(t[i10])
    s["rss_end_mb"] = float(rss[-1])
    s["rss_max_mb"] = float(rss.max())
    s["rss_growth_10pct_to_end_mb"] = round(float(rss[-1] - rss[i10]), 1)

    def slope(mask, y):
        return float(np.polyfit(t[mask] / 60.0, y[mask], 1)[0]) if mask.sum() >= 3 else float("nan")

    half = t >= args.duration / 2
    s["rss_slope_2nd_half_mb_per_min"] = round(slope(half, rss), 2)
    s["rss_slope_1st_half_mb_per_min"] = round(slope(~half & (t >= 0.1 * args.duration), rss), 2)
    s["rss_slope_last_third_mb_per_min"] = round(slope(t >= 2 * args.duration / 3, rss), 2)
    s["memory_flat"] = bool(abs(s["rss_slope_2nd_half_mb_per_min"]) <= args.flat_mb_per_min)
    s["horizon_full_at_s"] = round(LATENESS_S / args.time_scale, 1)  # event time spans the allowed lateness
    broker = np.array([r["broker_rss_mb"] for r in load])
    s["broker_rss_start_mb"], s["broker_rss_end_mb"] = float(broker[0]), float(broker[-1])
    for kind in ("interactions", "items"):
        lag = np.array([r[f"lag_{kind}"] for r in load])
        s[f"lag_{kind}_max"] = int(lag.max())
        s[f"lag_{kind}_p95"] = float(np.percentile(lag, 95))
        s[f"lag_{kind}_final_load"] = int(lag[-1])
        s[f"lag_{kind}_slope_2nd_half_per_min"] = round(slope(half, lag.astype(float)), 1)
    s["lag_interactions_p95_s_of_traffic"] = round(s["lag_interactions_p95"] / args.rate, 2)
    s["lag_bounded"] = bool(s["lag_interactions_p95"] <= args.rate * args.lag_bound_s)
    s["lag_interactions_after_drain"] = rows[-1]["lag_interactions"]
    s["lag_items_after_drain"] = rows[-1]["lag_items"]
    first, last = load[0], load[-1]
    dt = last["t_s"] - first["t_s"]
    if dt > 0:
        s["throughput_interactions_per_s"] = round((last["processed_interactions"]
                                                    - first["processed_interactions"]) / dt, 1)
        s["publish_rate_per_s"] = round((last["published_interactions"] - first["published_interactions"]) / dt, 1)
    s["processed_interactions_total"] = rows[-1]["processed_interactions"]
    s["processed_items_total"] = rows[-1]["processed_items"]
    s["dead_lettered"] = rows[-1]["dead_lettered"]
    s["cpu_pct_mean"] = round(float(np.mean([r["worker_cpu_pct"] for r in load[1:] or load])), 1)
    for key in ("state_mb", "offline_mb", "pairs_mb", "online_mb", "offline_files"):
        s[f"{key}_end"] = rows[-1][key]
        y = np.array([r[key] for r in load], float)
        s[f"{key}_per_min"] = round(slope(np.ones_like(t, bool), y), 2)
    for key in ("item_event_rows", "user_event_rows"):
        if rows[-1].get(key) is not None:
            s[f"{key}_end"] = rows[-1][key]
            s[f"{key}_max"] = max(r[key] or 0 for r in rows)
    return s


def write_outputs(args, out: Path, meta: dict, summary: dict, rows: list[dict]) -> None:
    cfg = {k: v for k, v in vars(args).items()}
    (out / "soak.json").write_text(json.dumps({"config": cfg, "meta": meta, "summary": summary, "samples": rows},
                                              indent=1, default=str))
    if rows:
        with open(out / "soak.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(args, out / "soak.png", rows, summary)


def plot(args, path: Path, rows: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, ax = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax[0].plot(t, [r["worker_rss_mb"] for r in rows], label="worker RSS (incl. children)")
    ax[0].set_ylabel("MB")
    ax[0].set_title(f"soak: {args.rate:,.0f} interactions/s + {args.new_item_rate:g} new items/s, "
                    f"{os.cpu_count()} cores (shared)\nRSS slope 2nd half "
                    f"{summary.get('rss_slope_2nd_half_mb_per_min', float('nan')):+.2f} MB/min")
    b = ax[0].twinx()
    b.plot(t, [r["broker_rss_mb"] for r in rows], color="tab:gray", ls=":", label="broker RSS (memory storage)")
    b.set_ylabel("broker MB", color="tab:gray")
    ax[0].legend(loc="upper left", title="red dotted: event time spans the 7-day allowed lateness", fontsize=8,
                 title_fontsize=8)
    ax[1].plot(t, [r["lag_interactions"] for r in rows], label="lag interactions")
    ax[1].plot(t, [r["lag_items"] for r in rows], label="lag items")
    ax[1].set_ylabel("events (end - committed)")
    ax[1].legend(loc="upper left")
    ax[2].plot(t, [r["state_mb"] for r in rows], label="state dir")
    ax[2].plot(t, [r["offline_mb"] for r in rows], label="Feast offline parquet")
    ax[2].plot(t, [r["pairs_mb"] for r in rows], label="pairs parquet")
    ax[2].set_ylabel("MB on disk")
    ax[2].set_xlabel("minutes since steady load started")
    ax[2].legend(loc="upper left")
    for a in ax:
        a.axvline(args.duration / 60, color="k", lw=0.6, ls="--")
        if LATENESS_S / args.time_scale < args.duration:
            a.axvline(LATENESS_S / args.time_scale / 60, color="tab:red", lw=0.6, ls=":")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(args, meta: dict, s: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 160))
    tab = Table(title="soak samples" + (f" (every {max(1, len(rows) // 24)}th)" if len(rows) > 24 else ""))
    cols = [("t s", "t_s", "{:.0f}"), ("phase", "phase", "{}"), ("RSS MB", "worker_rss_mb", "{:.1f}"),
            ("CPU %", "worker_cpu_pct", "{:.0f}"), ("lag int", "lag_interactions", "{:,}"),
            ("lag items", "lag_items", "{:,}"), ("processed", "processed_interactions", "{:,}"),
            ("ev/s", "interactions_per_s", "{:,.0f}"), ("parked", "parked", "{:,}"),
            ("state MB", "state_mb", "{:.1f}"), ("offline MB", "offline_mb", "{:.1f}"),
            ("broker MB", "broker_rss_mb", "{:.0f}")]
    for name, key in (("item_events", "item_event_rows"), ("user_events", "user_event_rows")):
        if rows and rows[-1].get(key) is not None:
            cols.append((name, key, "{:,}"))
    for name, *_ in cols:
        tab.add_column(name, justify="right")
    step = max(1, len(rows) // 24)
    shown = rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])
    for r in shown:
        tab.add_row(*("-" if r.get(k) is None else f.format(r[k]) for _, k, f in cols))
    con.print(tab)

    def g(k, f="{:,.1f}"):
        v = s.get(k)
        return "-" if v is None else f.format(v)

    summ = Table(title=f"soak summary ({os.cpu_count()} cores, shared with other work: load avg "
                       f"{meta.get('loadavg_start', [0])[0]:.1f} at start, {meta.get('loadavg_end', [0])[0]:.1f} at end)")
    summ.add_column("figure")
    summ.add_column("value", justify="right")
    summ.add_column("note")
    summ.add_row("steady load", f"{args.rate:,.0f}/s", f"interactions, + {args.new_item_rate:g} new items/s, "
                 f"{args.users:,} users, {args.items:,} starting items, {args.duration:.0f} s")
    summ.add_row("warm-up", g("warmup_s", "{:.0f} s"), "worker start + starting catalogue tokenized (not in the figures)")
    summ.add_row("publish rate achieved", g("publish_rate_per_s", "{:,.0f}/s"),
                 f"max behind schedule {g('publisher_max_behind', '{:,}')} events")
    summ.add_row("worker throughput", g("throughput_interactions_per_s", "{:,.0f}/s"),
                 f"{g('processed_interactions_total', '{:,}')} interactions, {g('processed_items_total', '{:,}')} items; "
                 f"dead-lettered {g('dead_lettered', '{:,}')}")
    summ.add_row("worker CPU (mean)", g("cpu_pct_mean", "{:.0f} %"), "of one core")
    summ.add_row("RSS at 10 % of the run", g("rss_at_10pct_mb", "{:,.1f} MB"), f"t = {g('rss_at_10pct_t_s', '{:.0f}')} s")
    summ.add_row("RSS at the end of the load", g("rss_end_mb", "{:,.1f} MB"),
                 f"growth {g('rss_growth_10pct_to_end_mb', '{:+,.1f}')} MB; max {g('rss_max_mb', '{:,.1f}')} MB")
    summ.add_row("RSS slope, 2nd half", g("rss_slope_2nd_half_mb_per_min", "{:+.2f} MB/min"),
                 f"1st half (from 10 %): {g('rss_slope_1st_half_mb_per_min', '{:+.2f}')} MB/min -> "
                 + ("[green]flat[/]" if s.get("memory_flat") else "[red]GROWING[/]")
                 + f" (threshold {args.flat_mb_per_min:g} MB/min); last third "
                 + f"{g('rss_slope_last_third_mb_per_min', '{:+.2f}')} MB/min")
    summ.add_row("state horizon full at", g("horizon_full_at_s", "{:,.0f} s"),
                 "event time spans the worker's 7-day allowed lateness: state detail stops growing (compaction)")
    summ.add_row("lag interactions max / p95", f"{g('lag_interactions_max', '{:,}')} / {g('lag_interactions_p95', '{:,.0f}')}",
                 f"p95 = {g('lag_interactions_p95_s_of_traffic', '{:.2f}')} s of traffic -> "
                 + ("[green]bounded[/]" if s.get("lag_bounded") else "[red]NOT bounded[/]")
                 + f" (<= {args.lag_bound_s:g} s); 2nd-half slope {g('lag_interactions_slope_2nd_half_per_min', '{:+,.0f}')}/min")
    summ.add_row("lag interactions final", g("lag_interactions_final_load", "{:,}"),
                 f"at the end of the load; after drain: {g('lag_interactions_after_drain', '{:,}')}")
    summ.add_row("lag items max / p95 / final", f"{g('lag_items_max', '{:,}')} / {g('lag_items_p95', '{:,.0f}')} / "
                 f"{g('lag_items_final_load', '{:,}')}", f"after drain: {g('lag_items_after_drain', '{:,}')}")
    summ.add_row("drained", "yes" if s.get("drained") else "[red]no[/]",
                 f"in {g('drain_s', '{:.0f}')} s after the publisher stopped" if s.get("drained")
                 else f"not within {args.drain_timeout:.0f} s")
    summ.add_row("state dir on disk", g("state_mb_end", "{:,.1f} MB"), f"{g('state_mb_per_min', '{:+.2f}')} MB/min")
    summ.add_row("Feast offline parquet", g("offline_mb_end", "{:,.1f} MB"),
                 f"{g('offline_mb_per_min', '{:+.2f}')} MB/min, {g('offline_files_end', '{:,}')} files")
    summ.add_row("pairs parquet / online.db", f"{g('pairs_mb_end')} / {g('online_mb_end')} MB",
                 f"pairs {g('pairs_mb_per_min', '{:+.2f}')} MB/min")
    summ.add_row("broker RSS", f"{g('broker_rss_start_mb', '{:,.0f}')} -> {g('broker_rss_end_mb', '{:,.0f}')} MB",
                 "Tansu memory storage keeps every record: grows by design")
    if s.get("item_event_rows_end") is not None:
        summ.add_row("state detail rows at the end", f"{g('item_event_rows_end', '{:,}')} / "
                     f"{g('user_event_rows_end', '{:,}')}", f"item_events / user_events (max {g('item_event_rows_max', '{:,}')}"
                     f" / {g('user_event_rows_max', '{:,}')}): the detail within the allowed lateness, also in memory")
    summ.add_row("code under test", str(meta.get("code")), "git HEAD of the checkout the worker ran from")
    summ.add_row("worker exit", str(meta.get("worker_died", meta.get("worker_exit_code"))),
                 "died during the run" if meta.get("worker_died") is not None else "after SIGTERM at the end")
    con.print(summ)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of steady load (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=2000, help="interaction events per second (default: %(default)s)")
    ap.add_argument("--users", type=int, default=5000, help="distinct users (default: %(default)s)")
    ap.add_argument("--items", type=int, default=2000, help="starting catalogue: first N MovieLens items "
                    "(default: %(default)s)")
    ap.add_argument("--new-item-rate", type=float, default=1.0, help="new items per second during the load "
                    "(rest of MovieLens, then synthetic re-releases; default: %(default)s)")
    ap.add_argument("--fresh-share", type=float, default=0.05, help="share of interactions on the 50 newest items")
    ap.add_argument("--fresh-delay", type=float, default=3.0, help="seconds after publishing before a new item "
                    "gets interactions")
    ap.add_argument("--label-rate", type=float, default=0.4, help="share of positive interactions")
    ap.add_argument("--time-scale", type=float, default=2016.0, help="event-time seconds per wall second "
                    "(default %(default)s: 10 wall minutes = 14 event days, twice the worker's 7-day allowed "
                    "lateness, so its state compaction is exercised; 1 = stamped with the wall clock)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds the worker gets to catch up after")
    ap.add_argument("--warmup-timeout", type=float, default=300.0)
    ap.add_argument("--flat-mb-per-min", type=float, default=1.0,
                    help="|RSS slope| over the second half at or below this counts as flat")
    ap.add_argument("--lag-bound-s", type=float, default=10.0,
                    help="p95 interaction lag at or below this many seconds of traffic counts as bounded")
    ap.add_argument("--no-count-item-events", dest="count_item_events", action="store_false",
                    help="do not count the state's item_events rows at each sample")
    ap.add_argument("--tokenizer", help="saved tokenizer artifact (default: fit a small one here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/soak", help="directory for soak.json, soak.csv, soak.png, worker.log")
    ap.add_argument("--work", help="work directory (default: a temp dir, removed at the end)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="trm-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rc, meta, rows = soak(args, work, out)
    except Exception as exc:
        log(f"soak failed: {exc!r}")
        raise
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(args, meta, rows)
    write_outputs(args, out, meta, summary, rows)
    print_report(args, meta, summary, rows)
    print(f"wrote {out / 'soak.json'}, {out / 'soak.csv'}, {out / 'soak.png'} (worker log {out / 'worker.log'})")
    if meta.get("worker_died") is not None:
        print(f"FAIL: the worker died (exit code {meta['worker_died']})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
