"""Trainer benchmark on the vendored MovieLens replay, everything real:

  1. tokenizer  a HybridTokenizer fitted on the data before the cutoff (time quantile 0.5), so the
                second half holds items it never saw (reused from --tokenizer if given / cached)
  2. features   embedded Tansu broker + the streams worker (item agent tokenizes every item,
                interaction agent builds histories and counters) write Feast (SQLite + DuckDB)
  3. trainer    TRM and the 4 baselines warm-started on the events before the cutoff
                (trainer/warm_start.py, --warm-epochs), then trained prequentially (score, then
                train) on the same point-in-time joined micro-batches, with the Vowpal Wabbit peer
                (trainer/peers.py) on the same rows: examples/s (all models, and trm alone), the
                warm start's time, the join's share of wall time (prefetched join, and a cold
                no-prefetch run for the raw join cost)
  4. quality    prequential AUC / GAUC / log-loss overall, after the cutoff, by item age at event
                time and on items the tokenizer never saw; dense/sparse parameter counts

    python bench/trainer_bench.py [--events 100000] [--batch-size 2048] [--tokenizer DIR] [--out DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "ml-latest-small"
CUTOFF_Q = 0.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def get_tokenizer(args, ds, cutoff: int) -> Path:
    """The artifact to use: --tokenizer, else a cached fit in artifacts/, else fit one now."""
    from tokenizer.hybrid import ArtifactError, HybridTokenizer, TokenizerConfig

    path = Path(args.tokenizer) if args.tokenizer else ROOT / "artifacts" / "bench-tokenizer"
    if (path / "manifest.json").exists():
        try:
            HybridTokenizer.load(path, verify_encoder=False)
            return path
        except ArtifactError as exc:
            if args.tokenizer:
                raise
            log(f"cached tokenizer does not load with this code ({exc}); refitting")

    before, _ = ds.split(cutoff)
    log(f"fitting the tokenizer on {len(before.items):,} items / {len(before.interactions):,} interactions "
        f"before {cutoff} (q={CUTOFF_Q})")
    tok = HybridTokenizer.fit(list(before.items.values()), before.interactions, TokenizerConfig(threads=2),
                              progress=False, fit_cutoff=cutoff)
    tok.save(path)
    return path


async def build_features(ds, events, tok_dir: Path, repo: Path, work: Path) -> dict:
    """Publish items then interactions to a fresh broker; the streams worker writes Feast."""
    from streams.app import StreamWorker, WorkerSettings
    from streams.broker import EmbeddedBroker
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_kind

    item_ids = {e.item_id for e in events}
    items = sorted((ds.items[i] for i in item_ids), key=lambda i: (i.created_at, i.item_id))
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
        create_topics(cfg)
        settings = WorkerSettings(repo_path=repo, tokenizer_dir=tok_dir, kafka=cfg, state_dir=work / "state",
                                  pairs_dir=work / "pairs", park_timeout_s=3600)
        t0 = time.perf_counter()
        async with StreamWorker(settings) as w:
            await w.wait_ready()
            await asyncio.to_thread(publish_kind, cfg, "items", [ItemEvent.from_item(i) for i in items], progress=False)
            await w.wait_for(items=len(items), timeout=1800)
            t_items = time.perf_counter() - t0
            log(f"item agent tokenized {len(items):,} items in {t_items:.0f} s")
            evs = [InteractionEvent.from_interaction(i) for i in events]
            await asyncio.to_thread(publish_kind, cfg, "interactions", evs, progress=False)
            await w.wait_for(interactions=len(evs), timeout=1800)
            status = w.status()
        t_all = time.perf_counter() - t0
    log(f"features for {len(events):,} interactions written in {t_all - t_items:.0f} s: {status['interactions']}")
    return {"items": len(items), "items_s": t_items, "interactions_s": t_all - t_items, "status": status}


def mean_results(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per model, the mean over seeds of every metric (and of every item-age bucket's AUC)."""
    import numpy as np

    out = {}
    for m in runs[0]:
        rs = [r[m] for r in runs]
        avg = {k: float(np.mean([r[k] for r in rs])) for k in ("auc", "gauc", "logloss")}
        avg["n"] = rs[0]["n"]
        avg["auc_seeds"] = [r["auc"] for r in rs]
        avg["by_age"] = {b: {"n": c["n"], "auc": float(np.mean([r["by_age"][b]["auc"] for r in rs]))}
                         for b, c in rs[0]["by_age"].items()}
        out[m] = avg
    return out


def train(repo: Path, tok, events, args, work: Path, name: str, prefetch: bool, max_events=None, seed: int = 0,
          history=None, items=None):
    """One run; with `history` a warm start on it first, with `items` the VW peer beside the models."""
    from trainer.assemble import build_trainer
    from trainer.peers import VWPeer, item_meta_of
    from trainer.pit_join import events_frame
    from trainer.prequential import run_events
    from trainer.warm_start import WarmStartConfig, warm_start

    shutil.rmtree(work / name, ignore_errors=True)  # a fresh run, never a resume of an earlier one
    tr = build_trainer(repo, tok, work / name / "ckpt", args.models.split(","),
                       config=dict(d_model=args.d_model, n_blocks=args.blocks),
                       learner=dict(minibatch=args.minibatch, lr=args.lr, seed=seed,
                                    **({"device": args.device} if args.device else {})),
                       log_path=work / name / "prequential.jsonl", checkpoint_every=args.checkpoint_every,
                       keep_predictions=True, peers={"vw": VWPeer(item_meta_of(items), seed=seed)} if items else None)
    (work / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if history:
        warm_start(tr, events_frame(history), WarmStartConfig(max_epochs=args.warm_epochs, seed=seed))
    n = run_events(tr, events, args.batch_size, max_events=max_events, prefetch=prefetch)
    wall = time.perf_counter() - t0
    return tr, n, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=None, help="interactions to replay (default: all 100,836)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer artifact (default: artifacts/bench-tokenizer, fitted if absent)")
    ap.add_argument("--models", default="trm,id,gen_only,two_gram,prefix_ngram,trm_no_ntp",
                    help="comma list; trm_no_ntp is the NTP ablation")
    ap.add_argument("--batch-size", type=int, default=2048, help="events per micro-batch (one PIT join)")
    ap.add_argument("--minibatch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default=None, help="the rankers' device: auto | cpu | cuda (default: TRM_TRAINER_DEVICE, else auto)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--warm-epochs", type=int, default=3, help="warm start before the cutoff: most epochs (0: none)")
    ap.add_argument("--seeds", type=int, default=2, help="prequential runs (seeds) averaged in the quality table")
    ap.add_argument("--raw-join-events", type=int, default=20_000, help="events of the no-prefetch run (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "out" / "trainer_bench"))
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from trm import quiet_third_party_warnings

    quiet_third_party_warnings()

    from rich.console import Console
    from rich.table import Table

    from streams.feature_repo_tools import materialize_repo
    from streams.movielens import load_movielens
    from trainer.assemble import tokenizer_info
    from trainer.evaluate import evaluate_frame
    from trainer.metrics import plot_curves, plot_results, results_table

    console = Console(width=180)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    ds = load_movielens(DATA)
    cutoff = ds.time_quantile(CUTOFF_Q)
    events = ds.interactions[: args.events] if args.events else ds.interactions
    tok_dir = get_tokenizer(args, ds, cutoff)
    tok = tokenizer_info(tok_dir, fit_cutoff=cutoff)
    log(f"tokenizer {tok.version[:12]}: L={tok.num_levels} K={tok.codebook_size}, fit cutoff {cutoff}")

    repo = work / "repo"
    stamp = work / "features.tokenizer_version"  # features in a reused repo must be this tokenizer's
    if (repo / "feature_store.yaml").exists() and stamp.exists() and stamp.read_text() == tok.version:
        feats = {"reused": str(repo)}
    else:
        shutil.rmtree(repo, ignore_errors=True)
        materialize_repo(repo)
        feats = asyncio.run(build_features(ds, events, tok_dir, repo, work))
        stamp.write_text(tok.version)

    raw = None
    if args.raw_join_events:
        tr, n, wall = train(repo, tok, events, args, work, "no-prefetch", prefetch=False, max_events=args.raw_join_events)
        raw = {"events": n, "wall_s": wall, "rate": n / wall, **tr.timings.shares()}
        log(f"no prefetch: {n / wall:,.0f} events/s, join {raw['join_s']:.0%} of wall time")

    runs_all, runs_after, warm_runs, alone = [], [], [], []
    history = [e for e in events if e.event_time < cutoff] if args.warm_epochs else None
    for seed in range(args.seeds):
        tr_s, n_s, wall_s = train(repo, tok, events, args, work, f"seed{seed}", prefetch=True, seed=seed,
                                  history=history, items=ds.items)
        warm_runs.append(tr_s.state.extra.get("warm_start"))
        alone.append(tr_s.learner.examples_per_s())
        if seed == 0:
            tr, n, wall = tr_s, n_s, wall_s
        t_s = tr_s.timings
        log(f"seed {seed}: {n_s / wall_s:,.0f} events/s, join wait {t_s.join_s / t_s.total_s:.0%}, "
            f"join busy {t_s.join_busy_s / t_s.total_s:.0%}")
        preds = tr_s.prediction_frame()
        names = tr_s.learner.names + list(tr_s.peers)
        runs_all.append(evaluate_frame(preds, names, cutoff))
        runs_after.append(evaluate_frame(preds[preds["event_time"] >= cutoff], names, cutoff))
    t = tr.timings
    shares = t.shares()
    overall, after = mean_results(runs_all), mean_results(runs_after)
    params = tr.learner.param_counts()
    # the peer's row: what a user would pick instead, on the same events (its ratio is the headline)

    speed = Table(title=f"Trainer throughput ({len(tr.learner.names)} models + {len(tr.peers)} peer, micro-batch "
                        f"{args.batch_size}, 1 torch thread, rankers on {tr.learner.device})")
    for c in ("run", "events", "events/s", "join wait", "join busy", "featurize", "predict", "train", "checkpoint"):
        speed.add_column(c, justify="right")
    rows = [("prefetched join", n, n / wall, shares["join_s"], t.join_busy_s / t.total_s, shares["featurize_s"],
             shares["predict_s"], shares["train_s"], shares["checkpoint_s"])]
    if raw:
        rows.append(("no prefetch", raw["events"], raw["rate"], raw["join_s"], raw["join_busy_s"], raw["featurize_s"],
                     raw["predict_s"], raw["train_s"], raw["checkpoint_s"]))
    for r in rows:
        speed.add_row(r[0], f"{r[1]:,}", f"{r[2]:,.0f}", *(f"{x:.0%}" for x in r[3:]))
    console.print(speed)
    import numpy as np

    by_model = {m: float(np.mean([a[m] for a in alone])) for m in alone[0]}
    console.print("each model alone (its own scoring + training, examples/s, mean of seeds): "
                  + ", ".join(f"{m} {v:,.0f}" for m, v in by_model.items()))
    if warm_runs[0]:
        ws = [w for w in warm_runs if w]
        console.print(f"warm start on {ws[0]['n_train']:,} events (+{ws[0]['n_valid']:,} validation): "
                      f"{np.mean([w['total_s'] for w in ws]):.1f} s mean "
                      f"(join {np.mean([w['join_s'] for w in ws]):.1f} s), "
                      f"epochs {[w['epochs'] for w in ws]}, kept {[w['best_epoch'] for w in ws]}")
    ptab = Table(title="Parameters (embedding tables = sparse)")
    for c in ("model", "dense", "sparse"):
        ptab.add_column(c, justify="right")
    for m, (d, s) in params.items():
        ptab.add_row(m, f"{d:,}", f"{s:,}")
    console.print(ptab)
    console.print(results_table(overall, f"Prequential quality, all {n:,} events (mean of {args.seeds} seeds)"))
    console.print(results_table(after, f"Prequential quality, events after the tokenizer cutoff ({cutoff}), "
                                       f"mean of {args.seeds} seeds"))
    seeds = Table(title="Prequential AUC per seed (after the cutoff) - the spread is the noise floor")
    seeds.add_column("model")
    for k in range(args.seeds):
        seeds.add_column(f"seed {k}", justify="right")
    for m, r in after.items():
        seeds.add_row(m, *(f"{a:.4f}" for a in r["auc_seeds"]))
    console.print(seeds)
    if "vw" in after:
        console.print("AUC after the cutoff relative to the vw peer (mean of seeds): " + ", ".join(
            f"{m} {r['auc'] - after['vw']['auc']:+.4f}" for m, r in after.items() if m != "vw"))
    console.print(f"unknown-token rows: {tr.fstats.unknown_item:,} of {tr.fstats.rows:,}; "
                  f"stale tokenizer version: {tr.fstats.stale_version:,}")

    plot_results(after, str(out / "auc_by_age.png"), "Prequential AUC by item age (events after the tokenizer cutoff)")
    plot_curves(str(work / "seed0" / "prequential.jsonl"), str(out / "prequential_auc.png"))
    (out / "trainer_bench.json").write_text(json.dumps({
        "events": n, "wall_s": wall, "events_per_s": n / wall, "device": str(tr.learner.device), "timings": vars(t), "no_prefetch": raw,
        "features": feats, "params": params, "warm_start": warm_runs, "examples_per_s_alone": by_model, "tokenizer": vars(tok), "overall": overall, "after_cutoff": after,
        "unknown_item_rows": tr.fstats.unknown_item, "args": vars(args)}, indent=1, default=str))
    log(f"wrote {out}/trainer_bench.json, auc_by_age.png, prequential_auc.png (work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
