"""Scale benchmark: how each cost grows with the data, S (100 k events) -> M (1 M) -> L (10 M).

A synthetic catalogue and stream run through the real path, per size in fresh processes:

  fit      HybridTokenizer.fit (alignment, residual k-means, BPE) on the catalogue: seconds, peak RSS
  store    the worker's own InteractionProcessor and ItemStatsProcessor (Avro decode -> state ->
           Feast online SQLite + offline part files, state saves), 2,048 events per batch, without
           Kafka: events/s and RSS against the users and items in its state; then the trainer's
           point-in-time join for 2,048- and 256-event batches from the latest 5 % of event time,
           Feast's get_historical_features vs the part-file index (trainer/pit_index.py), on part
           files and compacted, answers compared; compaction (full, then of what is new); the
           online read of 1 user + 100 items
  encoder  all-MiniLM-L6-v2 items/s on the generator's texts (once: it does not grow with size)

The generator: items carry text drawn from topic vocabularies (so tokens mean something) and
arrive over the timeline; popularity is Zipf-like over items already created; users come in
sessions of consecutive events and like items of their two favourite topics more; events arrive
in event-time order. The tokenizer fit reads *precomputed* embeddings (topic centroid + noise,
unit rows) at every size, so it measures the tokenizer and not the encoder; the encoder's own
rate is the `encoder` line. Sizes: S 100 k events / 10 k items / 1 k users, M 1 M / 100 k / 10 k,
L 10 M / 1 M / 100 k.

Above M (`FULL_MAX_EVENTS`) two stages change, and the output says so (`fit_sample`,
`feast_compare`):
  * the tokenizer is fitted on a uniform sample of `--fit-sample` items (100 k, M's whole
    catalogue) and the interactions on them, then encodes *every* item with it (what production
    does past ~1 M items: a fit is linear in the catalogue, encoding is cheap);
  * Feast's own `get_historical_features` over the whole store is not timed: it reads every row
    of every view on each call (M: 28 s per 2,048-event batch and 12.7 GB peak RSS at 1.9 M
    rows), so at 19 M rows it would not fit in this machine's 24 GB. The index's answers are
    still checked against Feast's, on the last 256 events the index joined: their users' and
    items' rows are copied (pyarrow filter) into a fresh repo, where Feast's join of those events
    is exact (a point-in-time join reads only the rows of the event's own entities). The index
    never hands a batch to Feast there (`pit_index` would for events older than its boundary):
    it raises instead of silently joining over the whole store.
The worker, index, compaction and online-read measurements are the same at every size.

    python bench/scale_bench.py [--sizes S,M] [--work DIR] [--plot scale.png] [--fit-sample 100000]
        [--fit-threads 2] [--merge-json earlier.json] [--feast-max-events 1000000]
    python bench/scale_bench.py --sizes L --reuse-store OLD_WORK/L --work DIR

`--reuse-store`: the trainer's follow phase (index build, joins, the check against Feast) on the
store an earlier run left (its size's work dir), without generating, fitting or running the worker
over the first 90 % again: the store is copied (part files hard-linked), the worker continues from
its saved state over [90 %, 95 %) while the trainer joins each batch, and the stage stops there.
`--feast-max-events`: above it, Feast's whole-store join is not timed and the check is the sample
one (below); M's whole-store join needs ~13 GB, so a shared machine runs M with e.g. 200000.

`--merge-json`: results of an earlier run (its last line) for sizes not run now, so one figure
and one table can show S and M from one run and L from another (each size keeps its own figures).

The last line printed is one JSON object with an entry per size (and "encoder").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"XS": (20_000, 2_000), "S": (100_000, 10_000),  # (events, items)
         "M": (1_000_000, 100_000), "L": (10_000_000, 1_000_000)}
N_TOPICS, DIM, PARTITIONS, BATCH = 40, 384, 4, 2048
T0, SPAN = 1_500_000_000, 365 * 86_400  # a year of event time
FULL_MAX_EVENTS = 1_000_000  # above: tokenizer fit on a sample, no whole-store Feast join (docstring)
FEAST_SAMPLE_EVENTS = 256  # above M: the index's answers for the last joined 256 events are checked against Feast


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the generator ------------------------------------------------------------------------------
def vocabularies(seed: int = 0) -> list[list[str]]:
    """N_TOPICS vocabularies of 30 pseudo-words each (distinct syllable mixes per topic)."""
    rng = np.random.default_rng(seed)
    syl = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "zen", "dra", "pel", "sor", "gu", "fen", "ix", "ba", "nor"]
    return [["".join(rng.choice(syl, size=3)) + str(t) for _ in range(30)] for t in range(N_TOPICS)]


def generate(n_events: int, n_items: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Items (topic, created time) and events (user, item, label, time), event-time ordered."""
    rng = np.random.default_rng(seed)
    n_users = max(n_events // 100, 10)
    topic = rng.integers(N_TOPICS, size=n_items)
    # 30 % of the catalogue exists at the start, the rest arrives uniformly over the year
    created = np.sort(np.where(rng.random(n_items) < 0.3, T0, T0 + rng.integers(0, SPAN, n_items)))
    # sessions: a user, a start, ~20 events 30 s apart
    n_sessions = n_events // 20 + 1
    lens = rng.geometric(1 / 20, n_sessions)
    lens = lens[: int(np.searchsorted(np.cumsum(lens), n_events)) + 1]
    lens[-1] -= lens.sum() - n_events
    lens = lens[lens > 0]
    # users: mildly skewed activity (weights 1 / rank^0.7), ~100 events per user on average
    uw = np.cumsum(1.0 / np.arange(1, n_users + 1) ** 0.7)
    s_user = rng.permutation(n_users)[np.searchsorted(uw, rng.random(len(lens)) * uw[-1])] + 1
    s_start = T0 + 3600 + rng.integers(0, SPAN - 7200, len(lens))
    user = np.repeat(s_user, lens)
    step = np.concatenate([np.arange(n) for n in lens])
    t = np.repeat(s_start, lens) + 30 * step
    order = np.argsort(t, kind="stable")
    user, t = user[order], t[order]
    # Zipf popularity (Pareto weights, exponent ~1.1), drawn among the items already created at t:
    # weights cumulated in creation order, so one searchsorted samples from the created prefix
    cw = np.cumsum(rng.pareto(1.1, n_items) + 1.0)
    n_created = np.searchsorted(created, t, side="right")
    item_idx = np.searchsorted(cw, rng.random(n_events) * cw[n_created - 1], side="right")
    item_idx = np.minimum(item_idx, n_created - 1)
    fav = rng.integers(N_TOPICS, size=(n_users + 1, 2))
    likes = (topic[item_idx] == fav[user, 0]) | (topic[item_idx] == fav[user, 1])
    label = (rng.random(n_events) < np.where(likes, 0.75, 0.3)).astype(np.int64)
    return dict(topic=topic, created=created, user=user.astype(np.int64), item=item_idx.astype(np.int64) + 1,
                label=label, t=t.astype(np.int64))


def item_texts(topic: np.ndarray, seed: int = 1) -> list[str]:
    voc = vocabularies()
    rng = np.random.default_rng(seed)
    out = []
    for i, tp in enumerate(topic.tolist()):
        words = rng.choice(voc[tp], size=6, replace=False)
        out.append(f"{words[0].title()} {words[1]} ({i}). Tags: {', '.join(words[2:])}")
    return out


def item_lexical(topic: np.ndarray, seed: int = 1) -> list[list[int]]:
    """The lexical tokens the item agent would write for item_texts' items (tokenizer/lexical.py): two
    categories (the topic and a neighbour), four title words (one of them the year) and the release
    year: 7 per item (ml-latest-small's items average 7.5)."""
    from tokenizer.lexical import lexical_tokens

    voc = vocabularies()
    rng = np.random.default_rng(seed)
    out = []
    for i, tp in enumerate(topic.tolist()):
        w = rng.choice(voc[tp], size=3, replace=False)
        out.append(lexical_tokens([f"topic {tp}", f"topic {(tp + 1) % N_TOPICS}"],
                                  f"{w[0]} {w[1]} {w[2]} ({1950 + i % 70})"))
    return out


def embeddings(topic: np.ndarray, seed: int = 2) -> np.ndarray:
    """Precomputed stand-ins for encoder output: a unit topic centroid + noise, unit rows."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(N_TOPICS, DIM)).astype(np.float32)
    x = np.empty((len(topic), DIM), np.float32)
    for lo in range(0, len(topic), 100_000):  # by row blocks: the same draws, without an N x 384 float64
        hi = min(lo + 100_000, len(topic))
        x[lo:hi] = cent[topic[lo:hi]] + 0.8 * rng.normal(size=(hi - lo, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def interaction_records(codec, d: dict, lo: int, hi: int, offsets: list[int]) -> list:
    """Events [lo, hi) of the stream as the worker's input records: Avro InteractionEvents keyed
    and partitioned by user (PARTITIONS), at the next offsets of `offsets` (advanced in place)."""
    from streams.contract.events import InteractionEvent
    from streams.dlq import SourceRecord

    recs = []
    for j in range(lo, hi):
        u = int(d["user"][j])
        p = u % PARTITIONS
        ev = InteractionEvent(f"e{j}", u, int(d["item"][j]), int(d["label"][j]), int(d["t"][j]))
        recs.append(SourceRecord("interactions", p, offsets[p], str(u).encode(),
                                 codec.encode(ev.to_record(), "InteractionEvent")))
        offsets[p] += 1
    return recs


# --- stages (each in its own process) ----------------------------------------------------------
def stage_fit(work: Path, size: str, fit_sample: int = 100_000, threads: int = 2) -> dict:
    """Fit on the catalogue (above FULL_MAX_EVENTS: on a uniform sample of `fit_sample` items and
    the interactions on them), then encode every item from its embedding."""
    from streams.movielens import Interaction, Item
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    d = dict(np.load(work / "data.npz"))
    n_items = len(d["topic"])
    texts = item_texts(d["topic"])
    cut = int(0.9 * len(d["t"]))  # fitted on the events before the follow window
    if len(d["t"]) > FULL_MAX_EVENTS and n_items > fit_sample:
        rows = np.sort(np.random.default_rng(3).choice(n_items, fit_sample, replace=False))
    else:
        rows = np.arange(n_items)
    items = [Item(int(i) + 1, texts[i], (), (), int(d["created"][i])) for i in rows]
    keep = np.isin(d["item"][:cut], rows + 1) if len(rows) < n_items else np.ones(cut, bool)
    inter = [Interaction(int(u), int(i), 4.0 if y else 2.0, int(y), int(t))
             for u, i, y, t in zip(d["user"][:cut][keep], d["item"][:cut][keep], d["label"][:cut][keep],
                                   d["t"][:cut][keep])]
    del texts
    emb = embeddings(d["topic"])
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    tok = HybridTokenizer.fit(items, inter, TokenizerConfig(levels=3, codebook_size=256, threads=threads),
                              progress=False, embeddings=emb[rows] if len(rows) < n_items else emb)
    fit_s = time.perf_counter() - t
    fit_rss = peak_rss_mb()
    del items, inter
    t = time.perf_counter()
    gen, mem, coarse = [], [], []
    for lo in range(0, n_items, 100_000):  # every item, in blocks
        toks = tok.encode_embeddings(emb[lo:lo + 100_000])
        gen.append(np.array([x.gen_tokens for x in toks], np.int64))
        mem += [json.dumps([int(m) for m in x.mem_tokens]) for x in toks]
        coarse += [json.dumps([int(c) for c in x.coarse_tokens]) for x in toks]
    gen = np.concatenate(gen)
    encode_s = time.perf_counter() - t
    np.savez(work / "tokens.npz", gen=gen, mem=np.array(mem), coarse=np.array(coarse), version=np.array(tok.version))
    return {"tokenizer_fit_s": fit_s, "tokenizer_fit_peak_rss_mb": fit_rss, "rss_before_fit_mb": rss0,
            "tokenizer_fit_items": int(len(rows)), "tokenizer_fit_interactions": int(keep.sum()),
            "tokenizer_fit_threads": threads, "tokenizer_encode_all_s": encode_s,
            "fit_sample": bool(len(rows) < n_items)}


def _norm(v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(int(x) for x in v)
    return v if isinstance(v, (str, bool, np.bool_)) or hasattr(v, "tz") else float(v)


def same_answers(a, b) -> bool:
    return list(a.columns) == list(b.columns) and all(
        [_norm(x) for x in a[c].tolist()] == [_norm(x) for x in b[c].tolist()] for c in a.columns)


def _reuse_store(src: Path, work: Path) -> Path:
    """A working copy of an earlier run's store `src` (a size's work dir: data.npz, tokens.npz,
    repo/, state/, stats-state/) in `work`, so the follow phase writes to the copy and `src` stays
    as it was: part files hard-linked (never modified in place: written under a temporary name and
    renamed), the online SQLite and the worker state copied, the repo re-applied (its registry
    holds absolute paths)."""
    from streams.feature_repo_tools import materialize_repo

    for old in ("repo", "state", "stats-state"):
        shutil.rmtree(work / old, ignore_errors=True)
    shutil.copytree(src / "repo" / "data" / "offline", work / "repo" / "data" / "offline", copy_function=os.link)
    shutil.copy2(src / "repo" / "data" / "online.db", work / "repo" / "data" / "online.db")
    for d in ("state", "stats-state"):
        shutil.copytree(src / d, work / d)
    return materialize_repo(work / "repo", source=src / "repo")


def stage_store(work: Path, size: str, reuse: str | None = None, feast_max_events: int = FULL_MAX_EVENTS) -> dict:
    """The worker, then the trainer's join, compaction and the online read (module docstring).

    `reuse`: an earlier run's store of this size (its work dir) instead of writing one: the worker
    phase is skipped, the follow phase (the worker writes [90 %, 95 %) while the trainer joins
    each batch through the index) runs on a copy (`_reuse_store`), and the stage ends there (the
    store's compaction and online read were measured when it was made)."""
    import pandas as pd
    import psutil

    from streams.compaction import compact_repo
    from streams.contract.codec import AvroCodec
    from streams.dlq import SourceRecord
    from streams.feast_sink import FeastSink
    from streams.feature_repo_tools import materialize_repo
    from streams.interaction_agent import InteractionProcessor
    from streams.item_stats_agent import ItemStatsProcessor
    from trainer.pit_index import IndexedJoiner
    from trainer.pit_join import historical_features

    d = dict(np.load(work / "data.npz"))
    tk = np.load(work / "tokens.npz")
    gen, mem, version = tk["gen"], [json.loads(m) for m in tk["mem"]], str(tk["version"])
    # every column the item agent writes (older tokens.npz: no coarse tokens)
    coarse = [json.loads(c) for c in tk["coarse"]] if "coarse" in tk.files else [[] for _ in mem]
    lexical = item_lexical(d["topic"])
    if reuse:
        repo = _reuse_store(Path(reuse), work)
    else:
        for old in ("repo", "state", "stats-state"):  # a rerun in the same --work starts from nothing
            shutil.rmtree(work / old, ignore_errors=True)
        repo = materialize_repo(work / "repo")
    sink = FeastSink(repo, writer_id="scale")
    me = psutil.Process()
    out: dict = {"events": int(len(d["t"])), "items": int(len(gen))}

    # item tokens as the item agent writes them, stamped at creation
    order = np.argsort(d["created"], kind="stable")
    for s in range(0, 0 if reuse else len(order), 20_000):
        idx = order[s:s + 20_000]
        sink.write("item_tokens", [{"item_id": int(i) + 1, "gen_tokens": gen[i].tolist(), "mem_tokens": mem[i],
                                    "coarse_tokens": coarse[i], "lexical_tokens": lexical[i],
                                    "tokenizer_version": version, "created_at": int(d["created"][i]),
                                    "retired": False, "event_timestamp": int(d["created"][i])} for i in idx])
    gen_of = {i + 1: g for i, g in enumerate(gen.tolist())}
    codec = AvroCodec()
    proc = InteractionProcessor(sink, work / "state", None, gen_of.get, "interactions", codec=codec)
    stats = ItemStatsProcessor(sink, work / "stats-state", "interactions_by_item", codec=codec)
    off = [0] * PARTITIONS
    off2 = [0] * PARTITIONS
    if reuse:  # the next offsets are past what the saved state applied
        proc.assign(list(range(PARTITIONS)))
        stats.assign(list(range(PARTITIONS)))
        off = [proc.hwm(p) + 1 for p in range(PARTITIONS)]
        off2 = [stats.hwm(p) + 1 for p in range(PARTITIONS)]
    n = len(d["t"])

    def run(lo: int, hi: int):
        res = proc.process(interaction_records(codec, d, lo, hi, off))
        proc.save(res.hwm)
        recs2 = []
        for key, value in res.outputs:
            p = int(key) % PARTITIONS
            recs2.append(SourceRecord("interactions_by_item", p, off2[p], key, value))
            off2[p] += 1
        res2 = stats.process(recs2)
        stats.save(res2.hwm)
        return len(res.dead) + len(res2.dead)

    def events(lo: int, hi: int) -> pd.DataFrame:
        return pd.DataFrame({"user_id": d["user"][lo:hi], "item_id": d["item"][lo:hi], "label": d["label"][lo:hi],
                             "event_time": d["t"][lo:hi]})

    # 1. the worker over the first 90 %: events/s and RSS against its state
    a, b = int(0.90 * n), int(0.95 * n)
    if reuse:
        out.update(reused_store=str(reuse), rows_offline_reused=sum(
            pq_rows(Path(repo) / "data" / "offline" / v) for v in ("user_history", "item_stats", "item_tokens")))
        log(f"{size}: store of {reuse} reused ({out['rows_offline_reused']:,} offline rows), worker from {a:,}, "
            f"offsets {off} / {off2}")
    curve, dead = [], 0
    t0 = time.perf_counter()
    marks = set(np.linspace(0, a, 11).astype(int)[1:].tolist())
    last_t, last_j = t0, 0
    for j in range(0, 0 if reuse else a, BATCH):
        hi = min(j + BATCH, a)
        dead += run(j, hi)
        if any(j < m <= hi for m in marks):
            now = time.perf_counter()
            curve.append({"events": hi, "users": sum(len(s.users) for s in proc.states.values()),
                          "items": sum(len(s._tok) for s in proc.states.values()),
                          "user_detail_events": sum(s.n_detail()[0] for s in proc.states.values()),
                          "rss_mb": me.memory_info().rss / 2**20, "events_per_s": (hi - last_j) / (now - last_t)})
            last_t, last_j = now, hi
            log(f"{size} worker: {hi:,} events, {curve[-1]['events_per_s']:,.0f}/s, RSS {curve[-1]['rss_mb']:.0f} MB")
    if not reuse:
        out.update(worker_events_per_s=a / (time.perf_counter() - t0), worker_rss_mb=curve[-1]["rss_mb"],
                   worker_curve=curve, dead_letters=dead)
    files = lambda: sum(len(list((Path(repo) / "data" / "offline" / v).glob("*.parquet")))  # noqa: E731
                        for v in ("item_tokens", "user_history", "item_stats"))
    out["rows_offline"] = sum(pq_rows(Path(repo) / "data" / "offline" / v) for v in ("user_history", "item_stats",
                                                                                       "item_tokens"))

    # 2. following [90 %, 95 %): the worker writes a batch, the trainer joins it through the index
    joiner = IndexedJoiner(str(repo))
    full = n <= feast_max_events
    if not full:
        joiner.feast = _refuse_feast  # every event below is answered by the index, or the bench stops
    rss0 = me.memory_info().rss
    t = time.perf_counter()
    joiner(events(a - BATCH, a))  # the first call reads every part file once
    out["index_build_s"] = time.perf_counter() - t
    out["index_build_peak_rss_mb"] = peak_rss_mb()  # of the stage so far (the worker's state included)
    out["index_build_rss_added_mb"] = (me.memory_info().rss - rss0) / 2**20
    log(f"{size} index build: {out['index_build_s']:.1f} s, peak RSS so far {out['index_build_peak_rss_mb']:.0f} MB "
        f"(+{out['index_build_rss_added_mb']:.0f} MB held after), rows held {joiner.rows_held}")
    idx_2048, idx_256, batches = [], [], []
    starts = list(range(a, b, BATCH))
    n256 = min(3, len(starts) // 2)
    for k, j in enumerate(starts):
        hi = min(j + BATCH, b)
        run(j, hi)
        if k < len(starts) - n256:  # one 2,048-event join per worker batch...
            idx_2048.append(timed(lambda lo=j, hi=hi: joiner(events(lo, hi)))[1])
        else:  # ...and, for the last three, the same events as eight 256-event joins, in order
            idx_256 += [timed(lambda lo=lo: joiner(events(lo, min(lo + 256, hi))))[1] for lo in range(j, hi, 256)]
        batches.append((j, hi))
    out["index_rows_held"] = joiner.rows_held
    out["join_2048_all_s"], out["join_256_all_s"] = idx_2048, idx_256
    if idx_2048:
        out["join_2048_min_s"] = min(idx_2048)
    if idx_256:
        out["join_256_min_s"] = min(idx_256)
    last = batches[-3:]

    def feast_times(k: int) -> list[float]:
        return [timed(lambda lo=lo: historical_features(joiner.store, events(lo, lo + k)))[1] for lo, _ in last]

    out["files_part"] = files()
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    out.update(join_2048_s=med(idx_2048[1:] or idx_2048), join_256_s=med(idx_256))
    out["feast_compare"] = "whole store" if full else (
        f"sample: the last {FEAST_SAMPLE_EVENTS} events joined, their entities' rows in a fresh repo "
        f"(Feast's whole-store join is O(store): not run above {feast_max_events:,} events)")
    if full:
        f2048, f256 = feast_times(BATCH), feast_times(256)
        same = all(same_answers(joiner(events(lo, hi)), historical_features(joiner.store, events(lo, hi)))
                   for lo, hi in last)
        out.update(feast_join_2048_s=statistics.median(f2048), feast_join_2048_min_s=min(f2048),
                   feast_join_256_s=statistics.median(f256), index_equals_feast=same)
        log(f"{size} join 2048: index {out['join_2048_s']:.3f} s vs Feast {out['feast_join_2048_s']:.2f} s "
            f"({out['files_part']} files, identical: {same})")
    else:
        lo, hi = batches[-1]
        lo = lo + (hi - lo - 1) // 256 * 256  # the last 256-event join (newer than the index's boundary)
        same, n_rows = same_as_feast_sample(joiner, repo, events(lo, hi), work / "sample-repo")
        out.update(feast_join_2048_s=None, feast_join_256_s=None, index_equals_feast=same,
                   feast_sample_rows=n_rows)
        log(f"{size} join 2048: index {out['join_2048_s']:.3f} s ({out['files_part']} files); equal to Feast "
            f"on {FEAST_SAMPLE_EVENTS} sampled events ({n_rows:,} rows of their entities): {same}")

    if reuse:  # the follow phase was the point; the store's compaction was measured when made
        out["store_peak_rss_mb"] = peak_rss_mb()
        return out

    # 3. compaction of everything, then the joins on the compacted store
    t = time.perf_counter()
    compact_repo(repo, older_than_s=0, delete_grace_s=0)
    out["compaction_s"] = time.perf_counter() - t
    out["files_compacted"] = files()
    log(f"{size} compaction: {out['compaction_s']:.1f} s, {out['files_part']} -> {out['files_compacted']} files")
    if full:
        f2048c, f256c = feast_times(BATCH), feast_times(256)
    fresh = IndexedJoiner(str(repo))
    if not full:
        fresh.feast = _refuse_feast
    t = time.perf_counter()
    fresh(events(a - BATCH, a))
    out["index_build_compacted_s"] = time.perf_counter() - t
    ic = [timed(lambda lo=lo, hi=hi: fresh(events(lo, hi)))[1] for lo, hi in batches[-6:]]
    out["join_2048_compacted_s"] = statistics.median(ic)
    if full:
        same_c = all(same_answers(fresh(events(lo, hi)), historical_features(fresh.store, events(lo, hi)))
                     for lo, hi in last)
        out.update(feast_join_2048_compacted_s=statistics.median(f2048c),
                   feast_join_256_compacted_s=statistics.median(f256c), index_equals_feast_compacted=same_c)
    else:
        lo, hi = batches[-1]
        lo = lo + (hi - lo - 1) // 256 * 256
        same_c, _ = same_as_feast_sample(fresh, repo, events(lo, hi), work / "sample-repo-compacted")
        out.update(feast_join_2048_compacted_s=None, feast_join_256_compacted_s=None,
                   index_equals_feast_compacted=same_c)
    log(f"{size} compacted: index build {out['index_build_compacted_s']:.1f} s, join "
        f"{out['join_2048_compacted_s']:.3f} s, equal to Feast: {out['index_equals_feast_compacted']}")

    # 4. the last 5 % through the worker, then a compaction of what is new
    for j in range(b, n, BATCH):
        run(j, min(j + BATCH, n))
    t = time.perf_counter()
    res = compact_repo(repo, older_than_s=0, delete_grace_s=0)
    out["compaction_new_s"] = time.perf_counter() - t
    out["compaction_new_files"] = sum(r.merged for r in res)

    # 5. the online read a /rank request makes: 1 user + 100 candidate items
    rng = np.random.default_rng(0)
    lat = []
    for _ in range(40):
        ids = rng.integers(1, len(gen) + 1, 100).tolist()
        u = int(rng.choice(d["user"]))
        t = time.perf_counter()
        sink.store.get_online_features(features=["item_tokens:gen_tokens", "item_tokens:mem_tokens",
                                                 "item_tokens:coarse_tokens", "item_tokens:lexical_tokens",
                                                 "item_stats:item_n_interactions"],
                                       entity_rows=[{"item_id": i} for i in ids]).to_dict()
        sink.store.get_online_features(features=["user_history:recent_item_ids", "user_history:user_n_events"],
                                       entity_rows=[{"user_id": u}]).to_dict()
        lat.append(time.perf_counter() - t)
    out["online_read_p50_ms"] = 1000 * float(np.percentile(lat[5:], 50))
    out["online_read_p99_ms"] = 1000 * float(np.percentile(lat[5:], 99))
    out["store_peak_rss_mb"] = peak_rss_mb()
    return out


def _refuse_feast(events):
    raise RuntimeError("the index handed events to Feast's whole-store join above M (older than its boundary): "
                       "that join does not fit in memory here")


def same_as_feast_sample(joiner, repo: Path, ev, sample_repo: Path) -> tuple[bool, int]:
    """The index's answers for (up to FEAST_SAMPLE_EVENTS) events `ev` equal Feast's? Feast joins them
    in a fresh repo holding only the rows of their users and items (filtered from `repo`'s part
    files with pyarrow), which gives the same point-in-time answers for these events and costs
    O(their entities' rows) instead of O(store). Returns (equal, rows copied)."""
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    from streams.feast_sink import JOIN_KEYS, offline_dir
    from streams.feature_repo_tools import materialize_repo
    from trainer.pit_join import historical_features

    ev = ev.iloc[np.linspace(0, len(ev) - 1, min(FEAST_SAMPLE_EVENTS, len(ev))).astype(int)].reset_index(drop=True)
    shutil.rmtree(sample_repo, ignore_errors=True)
    small = materialize_repo(sample_repo, source=repo)  # the store's own definitions: its files' schema
    ids = {"user_id": sorted(set(ev["user_id"].tolist())), "item_id": sorted(set(ev["item_id"].tolist()))}
    n_rows = 0
    for view, key in JOIN_KEYS.items():
        src = offline_dir(repo, view)
        files = sorted(str(p) for p in src.glob("*.parquet"))
        table = pds.dataset(files, format="parquet").to_table(filter=pds.field(key).isin(ids[key]))
        pq.write_table(table, offline_dir(small, view) / "part-sample.parquet")
        n_rows += table.num_rows
    from feast import FeatureStore

    mine = joiner(ev)
    theirs = historical_features(FeatureStore(repo_path=str(small)), ev)
    return same_answers(mine, theirs), n_rows


def pq_rows(d: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in d.glob("*.parquet"))


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def stage_encoder(work: Path, size: str) -> dict:
    from tokenizer.encoder import ContentEncoder

    texts = item_texts(np.random.default_rng(0).integers(N_TOPICS, size=512))
    enc = ContentEncoder(threads=2)
    enc.encode(texts[:32], progress=False)  # warm-up
    t = time.perf_counter()
    enc.encode(texts, progress=False)
    return {"encoder_items_per_s": len(texts) / (time.perf_counter() - t)}


STAGES = {"fit": stage_fit, "store": stage_store, "encoder": stage_encoder}


def run_stage(stage: str, work: Path, size: str, extra: tuple[str, ...] = ()) -> dict:
    """A stage in a fresh interpreter: its RSS is its own, not the previous stage's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, __file__, "--stage", stage, "--size", size, "--work", str(work), *extra],
                       stdout=subprocess.PIPE, env=env, check=False, text=True)
    if p.returncode:
        raise SystemExit(f"stage {stage} of size {size} failed (exit {p.returncode}); its log is above")
    return json.loads(p.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in SIZES if s in results]
    sampled = [s for s in sizes if results[s].get("fit_sample")]
    fit_label = "tokenizer fit" + (f" ({', '.join(sampled)}: on a sample)" if sampled else "")
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))

    def pts(k):  # sizes without the figure (Feast's whole-store join above M) are left out
        xy = [(results[s]["rows_offline"], results[s].get(k)) for s in sizes if results[s].get(k) is not None]
        return [x for x, _ in xy], [y for _, y in xy]

    for k, lab in (("feast_join_2048_s", "Feast join, part files"), ("feast_join_2048_compacted_s", "Feast, compacted"),
                   ("join_2048_s", "index, part files"), ("join_2048_compacted_s", "index, compacted")):
        ax[0].plot(*pts(k), "o-", label=lab)
    ax[0].set(xscale="log", yscale="log", xlabel="offline rows", ylabel="s per 2,048-event batch",
              title="trainer's point-in-time join")
    ax[0].legend(fontsize=8)
    for k, lab in (("compaction_s", "compaction, all"), ("compaction_new_s", "compaction, new 5 %"),
                   ("tokenizer_fit_s", fit_label), ("index_build_s", "index build (once)")):
        ax[1].plot(*pts(k), "o-", label=lab)
    ax[1].set(xscale="log", yscale="log", xlabel="offline rows", ylabel="s", title="one-off costs")
    ax[1].legend(fontsize=8)
    for s in sizes:
        c = results[s]["worker_curve"]
        note = "" if len(c) > 1 else " (end only)"
        ax[2].plot([x["events"] for x in c], [x["rss_mb"] for x in c], "o-", label=f"{s} RSS{note}")
    ax[2].set(xscale="log", xlabel="events through the worker",
              ylabel="worker process RSS (MB)", title="worker memory")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="S,M", help="comma-separated of S, M, L (default S,M)")
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir, removed after)")
    ap.add_argument("--plot", default=None, help="write the curves to this PNG")
    ap.add_argument("--fit-sample", type=int, default=100_000,
                    help="above M: items the tokenizer is fitted on (every item is encoded)")
    ap.add_argument("--fit-threads", type=int, default=2, help="threads of the tokenizer fit (default 2)")
    ap.add_argument("--merge-json", default=None,
                    help="an earlier run's output (its last line, or a file holding it): the sizes not run now")
    ap.add_argument("--reuse-store", default=None, metavar="DIR",
                    help="one size only: an earlier run's work dir of that size (data.npz, tokens.npz, repo/, state/): "
                         "no generation, fit or worker phase; the follow phase (index build, joins, check against "
                         "Feast) runs on a copy of its store, DIR is left as it was")
    ap.add_argument("--feast-max-events", type=int, default=FULL_MAX_EVENTS,
                    help="above this many events, Feast's whole-store join is not timed and the index is checked "
                         f"against Feast on a sample (default {FULL_MAX_EVENTS:,}; M's whole-store join peaks at ~13 GB)")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        from trm import quiet_third_party_warnings

        quiet_third_party_warnings()
        kw = ({"fit_sample": args.fit_sample, "threads": args.fit_threads} if args.stage == "fit" else
              {"reuse": args.reuse_store, "feast_max_events": args.feast_max_events} if args.stage == "store" else {})
        print(json.dumps(STAGES[args.stage](Path(args.work), args.size, **kw)))
        return 0
    sizes = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"unknown size(s) {bad}: use {', '.join(SIZES)}")
    if not sizes and not args.merge_json:
        raise SystemExit("no sizes: give --sizes, or --merge-json to redraw earlier results")
    if args.reuse_store and len(sizes) != 1:
        raise SystemExit("--reuse-store takes one size (the size of the store it names)")
    base = Path(args.work or tempfile.mkdtemp(prefix="trm-scale-"))
    results: dict = {}
    store_args = ("--feast-max-events", str(args.feast_max_events))
    for s in sizes:
        work = base / s
        work.mkdir(parents=True, exist_ok=True)
        if args.reuse_store:  # the store's own events and tokens; nothing generated or fitted
            src = Path(args.reuse_store).resolve()
            for f in ("data.npz", "tokens.npz"):
                if not (work / f).exists():
                    shutil.copy2(src / f, work / f)
            r = run_stage("store", work, s, store_args + ("--reuse-store", str(src)))
            r["rows"] = r.get("rows_offline")
            results[s] = r
            (base / f"result-{s}.json").write_text(json.dumps(r))
            continue
        n_events, n_items = SIZES[s]
        t = time.perf_counter()
        np.savez(work / "data.npz", **generate(n_events, n_items))
        log(f"{s}: generated {n_events:,} events over {n_items:,} items in {time.perf_counter() - t:.1f} s")
        r = run_stage("fit", work, s, ("--fit-sample", str(args.fit_sample), "--fit-threads", str(args.fit_threads)))
        log(f"{s}: tokenizer fit {r['tokenizer_fit_s']:.1f} s on {r['tokenizer_fit_items']:,} items"
            f"{' (a sample)' if r['fit_sample'] else ''}, peak RSS {r['tokenizer_fit_peak_rss_mb']:.0f} MB; "
            f"every item encoded in {r['tokenizer_encode_all_s']:.1f} s")
        r.update(run_stage("store", work, s, store_args))
        r["rows"] = r["rows_offline"]
        results[s] = r
        (base / f"result-{s}.json").write_text(json.dumps(r))  # kept per size: a later run can merge it
    if sizes and not args.reuse_store:  # (none: only --merge-json's results, e.g. to redraw the figure)
        results["encoder"] = run_stage("encoder", base, "-")  # last: the one stage on two threads throughout
        log(f"encoder: {results['encoder']['encoder_items_per_s']:.0f} items/s")
    if args.merge_json:
        src = Path(args.merge_json)
        text = src.read_text() if src.is_file() else args.merge_json
        try:
            earlier = json.loads(text)
        except json.JSONDecodeError:  # a run's whole output: the results are its last line
            earlier = json.loads(text.strip().splitlines()[-1])
        for s in SIZES:
            if s in earlier and s not in results:
                results[s] = earlier[s]
                log(f"{s}: figures from {src if src.is_file() else 'the given JSON'} (not run now)")
        sizes = [s for s in SIZES if s in results]
    keys = ("rows", "files_part", "join_2048_s", "join_256_s", "feast_join_2048_s", "feast_join_256_s",
            "join_2048_compacted_s", "feast_join_2048_compacted_s", "index_build_s", "index_build_peak_rss_mb",
            "worker_events_per_s",
            "worker_rss_mb", "compaction_s", "compaction_new_s", "online_read_p99_ms", "tokenizer_fit_s",
            "tokenizer_fit_peak_rss_mb", "tokenizer_fit_items", "index_equals_feast", "index_equals_feast_compacted")
    print(f"{'':32}" + "".join(f"{s:>14}" for s in sizes), file=sys.stderr)
    for k in keys:
        print(f"{k:32}" + "".join(f"{results[s].get(k):>14,.3f}" if isinstance(results[s].get(k), float)
                                  else f"{results[s].get(k)!s:>14}" for s in sizes), file=sys.stderr)
    if args.plot:
        plot(results, Path(args.plot))
        log(f"curves written to {args.plot}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
