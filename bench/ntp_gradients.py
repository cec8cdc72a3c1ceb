"""Where the next-token objective (NTP) pulls TRM: gradient norms of each objective on the shared parameters.

TRM's loss is BCE + λ·NTP (trainer/models/trm.py). Both reach the parameters they share: the
gen-token table (item side, history and, when tied, the NTP output layer) and the user tower (history
pool, query and label embeddings: the NTP context). Over the point-in-time rows of a finished demo's
Feast repo, in event order, a TRM trains on chunks as the trainer does; every `--every` steps this
measures, on the next chunk and before stepping, the gradient of BCE and of λ·NTP separately on each
shared group: their norms, the ratio, and the cosine between them (negative: NTP pushes against
the ranking objective). The last line is one JSON object with the means per group.

    python bench/ntp_gradients.py --demo out/demo [--end 0.4] [--every 10] [--ntp-weight 0.1]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUPS = {  # parameter-name prefixes both objectives reach
    "gen_table": ("gen_emb.",),
    "user_tower": ("history_pool.", "query_tokens", "label_emb"),
}


def flat_grads(model, loss, names):
    import torch

    params = [p for n, p in model.named_parameters() if n in names]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=str(ROOT / "out" / "demo"), help="a finished `trm demo --out` directory")
    ap.add_argument("--data", default=str(ROOT / "data" / "ml-latest-small"))
    ap.add_argument("--end", type=float, default=0.4,
                    help="time quantile: rows before it (before the validation window)")
    ap.add_argument("--every", type=int, default=10, help="measure every this many optimizer steps")
    ap.add_argument("--ntp-weight", type=float, default=None, help="λ (default: RankerConfig's)")
    ap.add_argument("--tied-grad", action="store_true", help="let NTP's tied output layer push the whole gen table")
    ap.add_argument("--sum-levels", action="store_true", help="NTP as the sum (not mean) of the per-level CEs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from trm import quiet_third_party_warnings

    quiet_third_party_warnings()
    import numpy as np
    import torch
    import torch.nn.functional as F

    from streams.movielens import load_movielens
    from trainer.assemble import tokenizer_info
    from trainer.featurizer import Featurizer
    from trainer.models import RankerConfig, build_model
    from trainer.pit_join import FeastJoiner, events_frame

    demo = Path(args.demo)
    tok = tokenizer_info(demo / "tokenizer")
    ds = load_movielens(args.data)
    cut = ds.time_quantile(args.end)
    events = events_frame([i for i in ds.interactions if i.event_time < cut])
    print(f"joining {len(events):,} events before q={args.end} through {demo / 'feature_repo'}", file=sys.stderr)
    joined = FeastJoiner(str(demo / "feature_repo"))(events)
    over = {k: v for k, v in dict(ntp_weight=args.ntp_weight).items() if v is not None}
    cfg = RankerConfig(num_levels=tok.num_levels, codebook_size=tok.codebook_size, ntp_tied_grad=args.tied_grad,
                       ntp_mean_levels=not args.sum_levels, **over)
    batch, _ = Featurizer.for_config(cfg, tok.version, ngrams=False)(joined)
    torch.manual_seed(args.seed)
    model = build_model("trm", cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    groups = {g: {n for n, _ in model.named_parameters() if n.startswith(pre)} for g, pre in GROUPS.items()}
    rows = []
    step = 0
    for s in range(0, len(batch), 256):
        mb = batch.slice(slice(s, s + 256)).select(model.inputs)
        model.train()
        if step % args.every == 0:
            context = model.context_tokens(mb)  # (B, N_q + N_u, D): what NTP conditions on
            logits = model.score(mb, context)
            bce = F.binary_cross_entropy_with_logits(logits, mb.label)
            use = (mb.label > 0.5) & mb.known
            ntp = cfg.ntp_weight * model.generative.loss(context, mb.gen, model.gen_emb, use)
            row = {"step": step}
            for g, names in groups.items():
                gb, gn = flat_grads(model, bce, names), flat_grads(model, ntp, names)
                nb, nn_ = float(gb.norm()), float(gn.norm())
                row[g] = {"bce": nb, "ntp": nn_, "ratio": nn_ / max(nb, 1e-12),
                          "cos": float(F.cosine_similarity(gb, gn, dim=0)) if nb > 0 and nn_ > 0 else 0.0}
            rows.append(row)
        loss, _, _ = model.loss(mb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    for r in rows[:: max(1, len(rows) // 12)]:
        print(f"step {r['step']:5d}  " + "  ".join(
            f"{g}: |bce| {r[g]['bce']:.4f} |λ·ntp| {r[g]['ntp']:.4f} ratio {r[g]['ratio']:.2f} cos {r[g]['cos']:+.2f}"
            for g in GROUPS))
    summary = {g: {k: float(np.mean([r[g][k] for r in rows])) for k in ("bce", "ntp", "ratio", "cos")} for g in GROUPS}
    print(json.dumps({"steps": step, "measured": len(rows), "ntp_weight": cfg.ntp_weight, "tied_grad": args.tied_grad,
                      "mean_levels": not args.sum_levels, "groups": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
