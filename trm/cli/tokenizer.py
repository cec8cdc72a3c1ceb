"""`trm tokenizer fit|encode`. Heavy imports (torch, faiss, sentence-transformers) happen inside the
handlers so `trm --help` stays instant."""
from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="fit / apply the hybrid semantic tokenizer (gen + mem tokens)")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    f = sub.add_parser("fit", help="fit encoder alignment, RQ-Kmeans codebooks and BPE merges; save an artifact")
    f.add_argument("--data", required=True, help="MovieLens-layout directory (movies.csv, ratings.csv[, tags.csv])")
    f.add_argument("--out", required=True, help="artifact directory to write")
    f.add_argument("--cutoff-quantile", type=float, default=None,
                   help="fit only on items/interactions before this quantile of the timeline (e.g. 0.5)")
    f.add_argument("--levels", type=int, default=None, help="RQ levels L (default 3)")
    f.add_argument("--codebook", type=int, default=None, help="codes per level K (default 256)")
    f.add_argument("--mem-vocab", type=int, default=None, help="BPE vocabulary budget (default 8192)")
    f.add_argument("--threads", type=int, default=None, help="torch/faiss threads")
    f.add_argument("--align-epochs", type=int, default=None, help="alignment epochs (default 5)")
    f.add_argument("--no-align", action="store_true", help="skip collaborative alignment (identity projection)")
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("encode", help="print tokens from a saved artifact")
    e.add_argument("--artifact", required=True, help="directory written by `trm tokenizer fit`")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="item text to encode (repeatable)")
    src.add_argument("--data", help="MovieLens-layout directory: encode its items")
    e.add_argument("--limit", type=int, default=10, help="with --data: encode the first N items (default 10)")
    e.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    e.set_defaults(func=cmd_encode)


def _config_from_args(args: argparse.Namespace):
    from tokenizer.hybrid import TokenizerConfig

    overrides = {"levels": args.levels, "codebook_size": args.codebook, "mem_vocab_size": args.mem_vocab,
                 "threads": args.threads, "align_epochs": args.align_epochs, "seed": args.seed}
    cfg = TokenizerConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.no_align:
        cfg.align = False
    return cfg


def _report_table(report: dict, version: str):
    from rich.table import Table

    t = Table(title=f"tokenizer {version}", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, list):
            return ", ".join(fmt(x) for x in v)
        return str(v)

    t.add_row("items / interactions", f"{report['n_items']} / {report['n_interactions']}")
    enc = report.get("encoder", {})
    if enc.get("items_per_s"):
        t.add_row("encoder items/s", fmt(enc["items_per_s"]))
    al = report.get("alignment", {})
    for k in sorted(al):
        if k not in ("enabled", "loss_per_epoch"):
            t.add_row(f"align {k}", fmt(al[k]))
    for k, v in report.get("rq", {}).items():
        t.add_row(f"rq {k}", fmt(v))
    for k, v in report.get("bpe", {}).items():
        t.add_row(f"bpe {k}", fmt(v))
    for k, v in report.get("timings_s", {}).items():
        t.add_row(f"time {k} (s)", fmt(v))
    return t


def cmd_fit(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from streams.movielens import DataError, load_movielens
    from tokenizer.hybrid import HybridTokenizer, TokenizerError

    console = Console()
    try:
        ds = load_movielens(args.data)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    cutoff = None
    if args.cutoff_quantile is not None:
        if not 0.0 < args.cutoff_quantile <= 1.0:
            console.print("[red]error:[/red] --cutoff-quantile must be in (0, 1]")
            return 2
        cutoff = ds.time_quantile(args.cutoff_quantile)
        ds, _ = ds.split(cutoff)
        console.print(f"fitting on data before cutoff {cutoff} (q={args.cutoff_quantile}): "
                      f"{len(ds.items)} items, {len(ds.interactions)} interactions")
    try:
        tok = HybridTokenizer.fit(list(ds.items.values()), ds.interactions, _config_from_args(args),
                                  progress=not args.quiet, fit_cutoff=cutoff)
    except TokenizerError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    out = tok.save(args.out)
    console.print(_report_table(tok.fit_report, tok.version))
    console.print(f"saved {out} (version {tok.version})")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import json

    from rich.console import Console
    from rich.table import Table

    from streams.movielens import DataError, load_movielens
    from tokenizer.hybrid import ArtifactError, HybridTokenizer

    console = Console()
    try:
        tok = HybridTokenizer.load(args.artifact)
    except ArtifactError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.text:
        keys, texts = list(range(len(args.text))), list(args.text)
    else:
        try:
            ds = load_movielens(args.data)
        except DataError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2
        items = [ds.items[k] for k in sorted(ds.items)][: max(args.limit, 0)]
        keys, texts = [it.item_id for it in items], [it.text() for it in items]
    toks = tok.encode_texts(texts)
    if args.json:
        for k, text, t in zip(keys, texts, toks):
            print(json.dumps({"key": k, "text": text, "gen_tokens": t.gen_tokens, "mem_tokens": t.mem_tokens,
                              "tokenizer_version": t.tokenizer_version}))
        return 0
    table = Table(title=f"tokens ({tok.version}, L={tok.num_levels}, K={tok.codebook_size}, "
                        f"mem vocab={tok.mem_vocab_size})")
    table.add_column("item" if not args.text else "#")
    table.add_column("text", overflow="fold", max_width=60)
    table.add_column("gen_tokens")
    table.add_column("mem_tokens")
    for k, text, t in zip(keys, texts, toks):
        table.add_row(str(k), text, str(t.gen_tokens), str(t.mem_tokens))
    console.print(table)
    return 0

