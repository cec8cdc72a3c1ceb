"""Tokenizer benchmark: throughput of each stage and the quality figures, on real MovieLens.

    python bench/tokenizer_bench.py [--data DIR] [--limit N] [--threads T]

Stages are timed separately (encoder pass, alignment, RQ fit/encode, BPE learn/encode) so a
regression points at one of them. Throughputs are wall-clock on this machine: compare runs only
on the same hardware and thread count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "ml-latest-small"), help="MovieLens-layout directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items (by id) and their interactions")
    p.add_argument("--threads", type=int, default=2, help="torch/faiss threads (default 2)")
    p.add_argument("--levels", type=int, default=None)
    p.add_argument("--codebook", type=int, default=None)
    p.add_argument("--mem-vocab", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3, help="repetitions of the fast encode timings (best is shown)")
    return p.parse_args(argv)


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))

    from streams.movielens import load_movielens
    from tokenizer.encoder import ContentEncoder
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig
    from tokenizer.rq_kmeans import offset_codes

    ds = load_movielens(args.data)
    ids = sorted(ds.items)[: args.limit] if args.limit else sorted(ds.items)
    keep = set(ids)
    items = [ds.items[i] for i in ids]
    inter = [i for i in ds.interactions if i.item_id in keep]
    texts = [it.text() for it in items]
    overrides = {"levels": args.levels, "codebook_size": args.codebook, "mem_vocab_size": args.mem_vocab}
    cfg = TokenizerConfig(threads=args.threads, **{k: v for k, v in overrides.items() if v is not None})

    encoder = ContentEncoder(threads=args.threads, batch_size=cfg.encoder_batch_size)
    encoder.encode(texts[:64])  # model load + warm-up, not timed
    t = time.perf_counter()
    raw = encoder.encode(texts)
    t_enc = time.perf_counter() - t

    tok = HybridTokenizer.fit(items, inter, cfg, progress=False, embeddings=raw, encoder=encoder)
    rep = tok.fit_report
    aligned = tok.projector.project(raw)
    t_proj, _ = _best(lambda: tok.projector.project(raw), args.repeat)
    t_rq, codes = _best(lambda: tok.quantizer.encode(aligned), args.repeat)
    gen = offset_codes(codes, tok.codebook_size).tolist()
    t_bpe, mem = _best(lambda: tok.bpe.encode(gen), args.repeat)
    assert all(tok.bpe.decode(m) == g for m, g in zip(mem, gen)), "BPE round trip failed"
    t_tail, _ = _best(lambda: tok.encode_embeddings(raw), args.repeat)
    n = len(items)
    al, rq, bpe, tm = rep["alignment"], rep["rq"], rep["bpe"], rep["timings_s"]

    def row(name: str, value: str) -> None:
        print(f"  {name:<56}{value}")

    print(f"tokenizer bench — {args.data}: {n} items, {len(inter)} interactions; "
          f"L={cfg.levels} K={cfg.codebook_size} mem_vocab={cfg.mem_vocab_size}; threads={args.threads}")
    print("throughput")
    row("encoder (MiniLM-L6, CPU)", f"{n / t_enc:,.0f} items/s  ({t_enc:.1f} s)")
    row("alignment: mine pairs + train", f"{tm['align']:.1f} s  ({cfg.align_epochs} epochs, {al['train_pairs']} pairs)")
    row("projection apply", f"{n / t_proj:,.0f} items/s")
    row("RQ-Kmeans fit", f"{tm['rq_fit']:.2f} s")
    row("RQ-Kmeans encode", f"{n / t_rq:,.0f} items/s")
    row("BPE learn", f"{tm['bpe_learn']:.2f} s")
    row("BPE encode", f"{n / t_bpe:,.0f} items/s")
    row("embedding → tokens (projection+RQ+BPE)", f"{n / t_tail:,.0f} items/s")
    print("quality")
    row(f"alignment recall@{cfg.recall_k} held-out co-liked, before", f"{al[f'recall@{cfg.recall_k}_before']:.4f}")
    row(f"alignment recall@{cfg.recall_k} held-out co-liked, after", f"{al[f'recall@{cfg.recall_k}_after']:.4f}"
        f"  ({al['heldout_pairs']} held-out pairs)")
    row("RQ relative MSE after each level", ", ".join(f"{x:.3f}" for x in rq["rel_mse_per_level"]))
    row("RQ code usage per level", ", ".join(f"{x:.2f}" for x in rq["usage"]))
    row("RQ perplexity per level", ", ".join(f"{x:.1f}" for x in rq["perplexity"]))
    row("full-tuple collision rate", f"{rq['collision_rate']:.4f}  ({rq['unique_tuples']} unique tuples)")
    row("BPE vocab used / merges", f"{bpe['vocab_used']} / {bpe['merges']}")
    row("mem-tokens per item (mean)", f"{bpe['mean_pieces_per_item']:.3f}")
    row("items memorised as one mem-token", f"{bpe['single_piece_items']:.3f} of items, "
        f"{bpe['single_piece_interaction_share']:.3f} of interaction weight")
    row("tokenizer version", tok.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
