"""Dump a validation run's featurized rows and the rankers' own logits, for sweeps of the online part.

Why: the per-user table (trainer/models/user_weights.py) corrects the ranker's logit but never
feeds back into it (the ranker trains on its own BCE), so the ranker's logits of a run do not
depend on the table. One run of the real trainer on a finished demo's Feast repo, recorded here,
lets `bench/online_sweep.py` try table designs in seconds on exactly the rows the trainer saw.

Protocol (validation only, never the evaluated events): warm start on the events before --warm-end
(time quantile; the warm start's own early stopping uses its last 20 %), then prequential on
[--warm-end, --end), --end at most the tokenizer cutoff (0.5 in the demo). The Vowpal Wabbit peer
runs on the same rows. Every call of `Learner.predict_then_learn_users` (the warm start's pass over
its training rows in time order, then every prequential chunk) is recorded with the ranker's logits.

    python bench/validation_dump.py --demo out/demo [--warm-end 0.4] [--end 0.5] [--models trm] --out out/val.npz
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="a finished `trm demo` OUT dir (feature_repo, tokenizer)")
    ap.add_argument("--data", default=str(ROOT / "data" / "ml-latest-small"))
    ap.add_argument("--warm-end", type=float, default=0.4, help="time quantile: warm start before it")
    ap.add_argument("--end", type=float, default=0.5, help="time quantile: prequential until it (<= the cutoff)")
    ap.add_argument("--models", default="trm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-epochs", type=int, default=3)
    ap.add_argument("--config", default="", help="RankerConfig overrides, k=v comma separated (floats/ints/bools)")
    ap.add_argument("--learner", default="", help="LearnerConfig overrides, k=v comma separated")
    ap.add_argument("--vw-args", default=None, help="the peer's Vowpal Wabbit arguments instead of trainer.peers.DEFAULT_ARGS")
    ap.add_argument("--vw-extra", default="", help="extra Vowpal Wabbit arguments for the peer (e.g. '--ignore i': "
                                                   "no item-id namespace), a diagnostic")
    ap.add_argument("--vw-era", action="store_true", help="the peer also reads the era namespace (add -q ue)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from streams.movielens import load_movielens
    from tokenizer.hybrid import HybridTokenizer
    from trainer.assemble import TokenizerInfo, build_trainer
    from trainer.evaluate import window_events
    from trainer.metrics import auc
    from trainer.peers import DEFAULT_ARGS, VWPeer, item_meta_of
    from trainer.prequential import run_events
    from trainer.warm_start import WarmStartConfig, warm_start
    from trm import quiet_third_party_warnings

    quiet_third_party_warnings()
    demo = Path(args.demo)
    tok = HybridTokenizer.load(demo / "tokenizer", verify_encoder=False)
    info = TokenizerInfo(tok.num_levels, tok.codebook_size, tok.version, None)
    ds = load_movielens(args.data)
    events_warm = window_events(args.data, None, args.warm_end)
    events_val = window_events(args.data, args.warm_end, args.end)
    parse = lambda s: {k: _value(v) for k, v in (kv.split("=") for kv in s.split(",") if kv)}  # noqa: E731
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(demo / "feature_repo", info, Path(tmp) / "ckpt", models, parse(args.config),
                           {"threads": 1, "seed": args.seed, **parse(args.learner)}, keep_predictions=True,
                           peers={"vw": VWPeer(item_meta_of(ds.items), seed=args.seed,
                                                  args=f"{args.vw_args or DEFAULT_ARGS} {args.vw_extra}".strip(),
                                                  era=args.vw_era)})
        rec: list[dict] = []
        learner = tr.learner
        own = learner.predict_then_learn_users

        def recording(batch):
            logits = learner.logits(batch)
            probs = own(batch)
            keys = {}  # each model's own online keys (its table's; None for a model without them)
            for n in models:
                m = learner.models[n]
                k = m.online_keys(batch.select(m.inputs))
                keys[f"keys_{n}"] = k.numpy() if k is not None else np.zeros((len(batch), 0), np.int64)
            rec.append({"stats": batch.stats.numpy(), "user": batch.user_id.numpy(), "label": batch.label.numpy(),
                        "t": batch.event_time.numpy(), "known": batch.known.numpy(), "gen": batch.gen.numpy(),
                        "item": batch.item_id.numpy(), "recent_gen": batch.recent_gen.numpy(),
                        "recent_labels": batch.recent_labels.numpy(), "coarse": batch.coarse.numpy(),
                        "lexical": batch.lexical.numpy(), "era": batch.era.numpy(),
                        **keys,
                        **{f"z_{n}": z.numpy() for n, z in logits.items()},
                        **{f"p_{n}": p for n, p in probs.items()}})
            return probs

        learner.predict_then_learn_users = recording
        t0 = time.perf_counter()
        warm_start(tr, events_warm, WarmStartConfig(max_epochs=args.warm_epochs, seed=args.seed))
        n_warm = sum(len(r["label"]) for r in rec)
        run_events(tr, list(events_val.itertuples(index=False)), 2048, resume=False)
        print(f"ran in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = {k: np.concatenate([r[k] for r in rec]) for k in rec[0]}
    out["phase"] = np.r_[np.zeros(n_warm, np.int8), np.ones(len(out["label"]) - n_warm, np.int8)]
    pred = tr.prediction_frame()
    val = out["phase"] == 1
    assert np.array_equal(pred["label"].to_numpy(), out["label"][val]), "recorded rows differ from the predictions"
    out["p_vw"] = np.r_[np.full(n_warm, np.nan), pred["score_vw"].to_numpy()]
    out["created"] = np.r_[np.full(n_warm, np.nan), pd.to_numeric(pred["created_at"], errors="coerce").to_numpy(float)]
    out["fit_cutoff"] = np.array((tok.fit_report or {}).get("fit_cutoff") or -1)  # online_sweep's unseen bucket
    np.savez_compressed(args.out, **out)
    y = out["label"][val]
    for n in [*models, "vw"]:
        print(f"{n}: validation AUC {auc(y, out[f'p_{n}'][val]):.4f} on {val.sum():,} events")
    return 0


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


if __name__ == "__main__":
    raise SystemExit(main())
