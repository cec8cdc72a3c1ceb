"""Ranker quality across a tokenizer refresh: no refresh, migrated, from scratch, warm-started again.

Setup: a finished `trm demo` OUT dir (its Feast repo, its tokenizer A fitted at the demo's cutoff)
and the vendored data. The refresh happens at --refresh (a time quantile, default 0.75): tokenizer B
is `trm tokenizer refit` of A on the items and interactions before it (tokenizer/refit.py).

Features after the refresh: the demo's own point-in-time rows, with every token rewritten as a
rotated pipeline writes them: item tokens by B (an item's row read at t >= the refresh carries B's
tokens and version), and the user's history and recent events re-tokenized by B through their item
ids (`Retokenized` below). The stream rotation itself (workers switching, the backfill) is not run
here: this measures what the ranker does with B's tokens, not the pipeline that writes them.

Protocol per seed, model `trm` (the product's ranker) with the per-user table, as in the demo:
  prefix      warm start on the events before the demo's cutoff (A tokens), then prequential
              until the refresh; checkpoint
  no_refresh  (a) the prefix trainer goes on with A tokens after the refresh (VW beside it, as in
              the demo: the peer follows from the cutoff)
  migrated    (b) the prefix checkpoint, resumed with B's features and B's lineage: `trm train`'s
              migration (trainer/migrate.py), then on with B
  scratch     (c) a new ranker following B's features from the refresh
  warm_start  (d) a new ranker warm-started on all history before the refresh re-tokenized by B,
              then following from the refresh
Each arm's AUC is prequential over the events at or after the refresh, overall, on items created
at or after it, and on the first EARLY (5,000) events after it (where a ranker that lost its past is
weakest). Per seed, paired bootstrap intervals (90 %, users resampled, the same events for both
arms) of the differences the goals ask about. The last line is one JSON object: {arm: {"auc", "auc_new_items", ...}} (means over
--seeds) with each seed's figures and the timings.

Before the arms, `trm tokenizer backfill`'s own code runs on a copy of the demo's repo at the refresh
(skip it with --no-backfill): its time and rows written are reported, and the items' tokens it leaves
at T are checked against those the arms' joiner uses.

Goal (issue 15): migrated within 0.005 AUC of no_refresh and >= scratch + 0.02; on new items,
migrated >= no_refresh. Reported as met or not; nothing here is tuned toward it.

    python bench/rotation_bench.py --demo out/demo [--refresh 0.75] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("no_refresh", "migrated", "scratch", "warm_start")


class Retokenized:
    """A joiner whose rows at or after `since` carry tokenizer B's tokens, as after a rotation.

    Item tokens by item id (rows without tokens stay without); history and recent events by their
    item ids (a recent event whose item had no tokens then stays -1 x L)."""

    def __init__(self, inner, tokens: dict[int, tuple[list[int], list[int]]], version: str, since: float,
                 levels: int):
        self.inner, self.tokens, self.version, self.since, self.L = inner, tokens, version, since, levels

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        return self.rewrite(self.inner(df))

    @property
    def bulk(self):
        inner = getattr(self.inner, "bulk", self.inner)
        return lambda df: self.rewrite(inner(df))

    def rewrite(self, rows: pd.DataFrame) -> pd.DataFrame:
        if rows.empty:
            return rows
        rows = rows.copy()
        at = np.nonzero(rows["event_time"].to_numpy() >= self.since)[0]
        cols = {c: rows[c].tolist() for c in ("item_id", "gen_tokens", "mem_tokens", "tokenizer_version",
                                              "hist_item_ids", "hist_gen_tokens", "recent_item_ids",
                                              "recent_gen_tokens")}
        tok, L = self.tokens, self.L
        for j in at:
            if isinstance(cols["tokenizer_version"][j], str):
                gen, mem = tok[int(cols["item_id"][j])]
                cols["gen_tokens"][j], cols["mem_tokens"][j] = np.array(gen), np.array(mem)
                cols["tokenizer_version"][j] = self.version
            hist = cols["hist_item_ids"][j]
            if hist is not None and len(hist):
                cols["hist_gen_tokens"][j] = np.array([g for i in hist for g in tok[int(i)][0]])
            recent, rgen = cols["recent_item_ids"][j], cols["recent_gen_tokens"][j]
            if recent is not None and len(recent):
                cols["recent_gen_tokens"][j] = np.array(
                    [g for k, i in enumerate(recent)
                     for g in (tok[int(i)][0] if rgen[k * L] >= 0 else [-1] * L)])
        for c, v in cols.items():
            rows[c] = v
        return rows


EARLY = 5_000  # events right after the refresh: where a ranker that lost its past is weakest


def _after(pred: pd.DataFrame, since: int) -> pd.DataFrame:
    """The predictions at or after `since`, in one order for every arm (so arms pair event by event)."""
    p = pred[pred["event_time"] >= since]
    return p.sort_values(["event_time", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def _aucs(pred: pd.DataFrame, since: int) -> dict:
    from trainer.metrics import auc

    p = _after(pred, since)
    new = p["created_at"].to_numpy(dtype=float) >= since
    y = p["label"].to_numpy()
    out = {"events": int(len(p)), "new_item_events": int(new.sum())}
    for col in [c for c in p.columns if c.startswith("score_")]:
        name = col[len("score_"):]
        s = p[col].to_numpy()
        out[name] = {"auc": auc(y, s), "auc_new_items": auc(y[new], s[new]),
                     f"auc_first_{EARLY}": auc(y[:EARLY], s[:EARLY])}
    return out


def paired_interval(y: np.ndarray, s1: np.ndarray, s2: np.ndarray, users: np.ndarray, n: int = 400,
                    seed: int = 0) -> list[float]:
    """90 % interval of AUC(s1) - AUC(s2) over bootstrap resamples of users (a user's events stay
    together: they are correlated), the same events for both arms (paired). One seed's spread only."""
    from trainer.metrics import auc

    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(users, return_inverse=True)
    rows = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])  # events per user
    d = []
    for _ in range(n):
        i = np.concatenate([rows[k] for k in rng.integers(0, len(uniq), len(uniq))])
        d.append(auc(y[i], s1[i]) - auc(y[i], s2[i]))
    return [round(float(np.percentile(d, 5)), 4), round(float(np.percentile(d, 95)), 4)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--demo", required=True, help="a finished `trm demo` OUT dir (feature_repo, tokenizer)")
    ap.add_argument("--data", default=str(ROOT / "data" / "ml-latest-small"))
    ap.add_argument("--refresh", type=float, default=0.75, help="time quantile of the refresh")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--warm-epochs", type=int, default=2, help="warm start epochs (the demo's default)")
    ap.add_argument("--no-backfill", action="store_true",
                    help="skip the real backfill on a copy of the demo's repo (its time and rows written)")
    ap.add_argument("--work", default=None, help="where to keep B and the embeddings (default OUT/rotation)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from streams.movielens import load_movielens
    from tokenizer.encoder import ContentEncoder
    from tokenizer.hybrid import HybridTokenizer
    from trainer.assemble import TokenizerInfo, build_trainer
    from trainer.peers import VWPeer, item_meta_of
    from trainer.prequential import run_events
    from trainer.warm_start import WarmStartConfig, warm_start
    from trm import quiet_third_party_warnings

    quiet_third_party_warnings()
    console = Console(stderr=True)
    demo = Path(args.demo)
    work = Path(args.work or demo / "rotation")
    work.mkdir(parents=True, exist_ok=True)
    repo = demo / "feature_repo"
    a = HybridTokenizer.load(demo / "tokenizer", verify_encoder=False)
    cutoff = int(json.loads((demo / "report.json").read_text())["cutoff"])
    ds = load_movielens(args.data)
    T = ds.time_quantile(args.refresh)
    ids = sorted(ds.items)
    timings: dict[str, float] = {}

    # embeddings of every item once (the encoder is the cost), then B = refit of A before T
    emb_path = work / "embeddings.npz"
    t0 = time.perf_counter()
    if emb_path.exists() and np.array_equal(np.load(emb_path)["ids"], ids):
        emb = np.load(emb_path)["emb"]
    else:
        emb = ContentEncoder(threads=2).encode([ds.items[i].text() for i in ids], progress=True)
        np.savez(emb_path, ids=np.array(ids), emb=emb)
    timings["embed_s"] = time.perf_counter() - t0
    before, _ = ds.split(T)
    row = {i: r for r, i in enumerate(ids)}
    t0 = time.perf_counter()
    b_items = [before.items[i] for i in sorted(before.items)]
    b = HybridTokenizer.refit(a, b_items, before.interactions, progress=False, fit_cutoff=T,
                              embeddings=emb[[row[it.item_id] for it in b_items]])
    timings["refit_s"] = time.perf_counter() - t0
    b.save(work / "tokenizer_B")
    rep = b.fit_report
    console.print(f"refresh at q{args.refresh} (t={T}); B = {b.version} refitted from {a.version} on "
                  f"{len(b_items):,} items in {timings['refit_s']:.1f} s; level codes changed "
                  f"{[round(x, 3) for x in rep['refit']['code_changed']]} (scratch "
                  f"{[round(x, 3) for x in rep['scratch']['code_changed']]})")
    tokens_b = {i: (t.gen_tokens, t.mem_tokens) for i, t in zip(ids, b.encode_embeddings(emb))}
    backfill = _backfill(repo, work, b, T, args.data) if not args.no_backfill else "not run (--no-backfill)"
    if isinstance(backfill, dict):
        same = sum(tokens_b.get(i, (None,))[0] == g for i, g in backfill.pop("gen_at_T").items())
        backfill["items_equal_to_the_joiner's"] = same
        console.print(f"backfill (real, on a copy of the demo's repo): {backfill['items_written']:,} item rows and "
                      f"{backfill['users_written']:,} user rows in {backfill['seconds']:.0f} s; {same:,} of the "
                      f"items' tokens at T equal what the arms' joiner uses")
    info_a = TokenizerInfo(a.num_levels, a.codebook_size, a.version, cutoff)
    info_b = TokenizerInfo(b.num_levels, b.codebook_size, b.version, T, b.lineage)

    inter = sorted(ds.interactions, key=lambda i: i.event_time)
    frame = lambda evs: pd.DataFrame([(i.user_id, i.item_id, i.label, i.event_time) for i in evs],  # noqa: E731
                                     columns=["user_id", "item_id", "label", "event_time"])
    warm_events = frame([i for i in inter if i.event_time < cutoff])
    history_b = frame([i for i in inter if i.event_time < T])
    follow = list(frame([i for i in inter if i.event_time >= cutoff]).itertuples(index=False))
    after = [e for e in follow if e.event_time >= T]
    n_pre = len(follow) - len(after)
    console.print(f"{len(warm_events):,} warm-start events, {n_pre:,} followed before the refresh, "
                  f"{len(after):,} scored after it")

    per_seed: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        res: dict[str, dict] = {}
        learner = {"threads": 1, "seed": seed}
        wcfg = WarmStartConfig(max_epochs=args.warm_epochs, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            pre = build_trainer(repo, info_a, tmp / "a" / "ckpt", ["trm"], None, learner, keep_predictions=False,
                                peers={"vw": VWPeer(item_meta_of(ds.items), seed=seed)})
            warm_start(pre, warm_events, wcfg)
            run_events(pre, follow[:n_pre], 2048, resume=False)
            shutil.copytree(tmp / "a" / "ckpt", tmp / "b" / "ckpt")
            timings[f"prefix_s_{seed}"] = time.perf_counter() - t0

            t0 = time.perf_counter()  # (a) the same trainer, on with A
            pre.keep_predictions = True
            run_events(pre, follow, 2048, resume=False)
            res["no_refresh"] = _aucs(pre.prediction_frame(), T)
            frames = {"no_refresh": _after(pre.prediction_frame(), T)}
            timings[f"no_refresh_s_{seed}"] = time.perf_counter() - t0

            t0 = time.perf_counter()  # (b) resume the prefix checkpoint with B: migration
            mig = build_trainer(repo, info_b, tmp / "b" / "ckpt", ["trm"], None, learner, keep_predictions=True)
            mig.joiner = Retokenized(mig.joiner, tokens_b, b.version, T, b.num_levels)
            run_events(mig, follow, 2048)
            res["migrated"] = _aucs(mig.prediction_frame(), T)
            frames["migrated"] = _after(mig.prediction_frame(), T)
            res["migrated"]["migration"] = mig.state.extra.get("migrations", [])[-1:]
            timings[f"migrated_s_{seed}"] = time.perf_counter() - t0

            t0 = time.perf_counter()  # (c) a new ranker from the refresh
            scratch = build_trainer(repo, info_b, tmp / "c" / "ckpt", ["trm"], None, learner, keep_predictions=True)
            scratch.joiner = Retokenized(scratch.joiner, tokens_b, b.version, -np.inf, b.num_levels)
            run_events(scratch, after, 2048, resume=False)
            res["scratch"] = _aucs(scratch.prediction_frame(), T)
            frames["scratch"] = _after(scratch.prediction_frame(), T)
            timings[f"scratch_s_{seed}"] = time.perf_counter() - t0

            t0 = time.perf_counter()  # (d) a new ranker warm-started on all history in B's tokens
            ws = build_trainer(repo, info_b, tmp / "d" / "ckpt", ["trm"], None, learner, keep_predictions=True)
            ws.joiner = Retokenized(ws.joiner, tokens_b, b.version, -np.inf, b.num_levels)
            warm_start(ws, history_b, wcfg)
            run_events(ws, after, 2048, resume=False)
            res["warm_start"] = _aucs(ws.prediction_frame(), T)
            frames["warm_start"] = _after(ws.prediction_frame(), T)
            timings[f"warm_start_s_{seed}"] = time.perf_counter() - t0
        # paired 90 % intervals of the differences the goals ask about, on this seed's events
        ref = frames["no_refresh"]
        y, u, new_items = ref["label"].to_numpy(), ref["user_id"].to_numpy(), ref["created_at"].to_numpy(float) >= T
        keys = ["event_time", "user_id", "item_id", "label"]
        assert all(len(f) == len(ref) and (f[keys].to_numpy() == ref[keys].to_numpy()).all()
                   for f in frames.values()), "the arms did not score the same events"
        sc = {arm: f["score_trm"].to_numpy() for arm, f in frames.items()}
        m, e = new_items, slice(0, EARLY)
        res["intervals"] = {
            "migrated_minus_no_refresh": paired_interval(y, sc["migrated"], sc["no_refresh"], u),
            "migrated_minus_no_refresh_new_items": paired_interval(y[m], sc["migrated"][m], sc["no_refresh"][m], u[m]),
            "migrated_minus_scratch": paired_interval(y, sc["migrated"], sc["scratch"], u),
            f"migrated_minus_scratch_first_{EARLY}": paired_interval(y[e], sc["migrated"][e], sc["scratch"][e], u[e])}
        per_seed.append(res)
        console.print(f"seed {seed}: " + ", ".join(
            f"{arm} {res[arm]['trm']['auc']:.4f} / new {res[arm]['trm']['auc_new_items']:.4f}" for arm in ARMS)
            + f"; vw {res['no_refresh']['vw']['auc']:.4f}")

    mean = lambda arm, k, model="trm": float(np.mean([r[arm][model][k] for r in per_seed]))  # noqa: E731
    summary = {arm: {"auc": mean(arm, "auc"), "auc_new_items": mean(arm, "auc_new_items"),
                     f"auc_first_{EARLY}": mean(arm, f"auc_first_{EARLY}")} for arm in ARMS}
    summary["vw_no_refresh"] = {"auc": mean("no_refresh", "auc", "vw"),
                                "auc_new_items": mean("no_refresh", "auc_new_items", "vw")}
    a_, b_, c_ = summary["no_refresh"], summary["migrated"], summary["scratch"]
    goals = {"migrated_within_0.005_of_no_refresh": abs(b_["auc"] - a_["auc"]) <= 0.005 or b_["auc"] > a_["auc"],
             "migrated_ge_scratch_plus_0.02": b_["auc"] >= c_["auc"] + 0.02,
             "migrated_new_items_ge_no_refresh": b_["auc_new_items"] >= a_["auc_new_items"]}
    table = Table(title=f"AUC after a refresh at q{args.refresh} (trm, mean of {len(per_seed)} seeds; "
                        f"{per_seed[0]['no_refresh']['events']:,} events, "
                        f"{per_seed[0]['no_refresh']['new_item_events']:,} on new items)")
    for col in ("arm", "AUC", "AUC new items", f"AUC first {EARLY:,}"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm in (*ARMS, "vw_no_refresh"):
        first = summary[arm].get(f"auc_first_{EARLY}")
        table.add_row(arm, f"{summary[arm]['auc']:.4f}", f"{summary[arm]['auc_new_items']:.4f}",
                      "—" if first is None else f"{first:.4f}")
    Console().print(table)
    for k in per_seed[0]["intervals"]:
        Console().print(f"{k}: paired 90 % interval per seed " + ", ".join(str(r["intervals"][k]) for r in per_seed))
    for k, v in goals.items():
        Console().print(f"goal {k}: {'met' if v else 'NOT met'}")
    print(json.dumps({**summary, "goals": goals, "refresh_time": T, "tokenizer_a": a.version,
                      "tokenizer_b": b.version,
                      "refit": {k: rep["refit"][k] for k in ("code_changed", "tuple_changed")},
                      "backfill": backfill,
                      "seeds": per_seed, "timings_s": timings}, default=float))
    return 0


def _backfill(repo: Path, work: Path, b, T: int, data: str) -> dict:
    """`trm tokenizer backfill`'s own code on a copy of the demo's repo at T: its time and rows written,
    and each item's gen-tokens at T as the backfilled store answers (the arms' joiner must agree)."""
    from feast import FeatureStore

    from streams.backfill import BackfillConfig, texts_at
    from streams.feature_repo_tools import materialize_repo
    from streams.backfill import backfill as run_backfill
    from streams.publisher import item_events

    copy = work / "backfilled_repo"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(repo, copy)
    materialize_repo(copy, source=repo)  # re-apply: the copied registry's sources still name the original's files
    rep = run_backfill(BackfillConfig(copy, T, progress=True), b, texts_at(item_events(data), T))
    out = rep.to_dict()
    rows = [(i, T) for i in sorted(rep_items(copy))]
    ent = pd.DataFrame({"item_id": [i for i, _ in rows],
                        "event_timestamp": pd.to_datetime([t for _, t in rows], unit="s", utc=True)})
    got = FeatureStore(repo_path=str(copy)).get_historical_features(
        ent, ["item_tokens:gen_tokens", "item_tokens:tokenizer_version"]).to_df()
    got = got[got["tokenizer_version"] == b.version]
    out["gen_at_T"] = {int(i): [int(x) for x in g] for i, g in zip(got["item_id"], got["gen_tokens"])}
    return out


def rep_items(repo: Path) -> set[int]:
    """Item ids with a row in the repo's item_tokens part files."""
    from streams.backfill import ITEMS, read_rows

    return {int(r["item_id"]) for r in read_rows(repo, ITEMS)}


if __name__ == "__main__":
    raise SystemExit(main())
