"""`trm tokenizer fit|refit|rotate|backfill|encode`. Heavy imports (torch, faiss,
sentence-transformers) happen inside the handlers so `trm --help` stays instant."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


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

    r = sub.add_parser("refit", help="refit on recent data, warm-started from an artifact, its ids kept where "
                                     "their clusters persist (tokenizer/refit.py); writes a new artifact with lineage",
                       description="Refit the codebooks and BPE merges of --from on the data before --cutoff-quantile, "
                                   "each level warm-started from the old centroids and matched to the old ids by an "
                                   "optimal assignment; the old projection, geometry (L, K, mem vocab) and encoder are "
                                   "kept. The new artifact's lineage.json maps its ids to the old ones, which is what "
                                   "lets `trm train` migrate a checkpoint across the refresh. The report compares the "
                                   "refit with a refit from scratch on the same items.")
    r.add_argument("--from", dest="old", required=True, help="the artifact in use (directory of `trm tokenizer fit`)")
    r.add_argument("--data", required=True, help="MovieLens-layout directory (movies.csv, ratings.csv[, tags.csv])")
    r.add_argument("--out", required=True, help="artifact directory to write")
    r.add_argument("--cutoff-quantile", type=float, default=None,
                   help="refit on items/interactions before this quantile of the timeline (default: all)")
    r.add_argument("--since-quantile", type=float, default=None,
                   help="count only interactions from this quantile on for the BPE merges (recent popularity); "
                        "the catalogue is every item known before the cutoff")
    r.add_argument("--no-compare", action="store_true", help="skip the from-scratch comparison fit")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_refit)

    ro = sub.add_parser("rotate", help="record a rotation: the stream's workers switch to a new artifact at a time T "
                                       "(streams/rotation.py)",
                        description="Write <repo>/rotation.json ($TRM_ROTATION_FILE if set): item events at or "
                                    "after --at are tokenized by --artifact, earlier ones by --from; user rows at or "
                                    "after --at wait for `trm tokenizer backfill`. Running workers re-read the record; no restart needed. "
                                    "Both artifacts must verify against the installed encoder.")
    ro.add_argument("--repo", default=None, help="the workers' Feast repo (default $TRM_FEAST_REPO)")
    ro.add_argument("--artifact", required=True, help="the new artifact (e.g. a `trm tokenizer refit` output)")
    ro.add_argument("--at", required=True, help="rotation time T: epoch seconds, ISO 8601 (UTC if no zone) or 'now'")
    ro.add_argument("--from", dest="old", default=None,
                    help="the artifact in use (default: the current record's new artifact; "
                         "required for a first rotation)")
    ro.set_defaults(func=cmd_rotate)

    b = sub.add_parser("backfill", help="re-tokenize every item with the new artifact at the rotation time and rewrite "
                                        "user histories' tokens (streams/backfill.py)",
                       description="Re-tokenize every item the store has at or before T with the new artifact, from "
                                   "its text as of T, stamped at T (offline part files and online store through the "
                                   "stream's FeastSink); re-stamp each user's history at T, and rewrite later rows, "
                                   "with the new artifact's tokens; then mark the rotation record backfilled. Point-in-"
                                   "time answers before T do not change. Idempotent: a second run writes nothing. "
                                   "With a Kafka bootstrap ($TRM_KAFKA_BOOTSTRAP or --bootstrap), the new tokens also "
                                   "go to the item_tokens topic, which running workers need.")
    b.add_argument("--repo", default=None, help="the workers' Feast repo (default $TRM_FEAST_REPO)")
    b.add_argument("--artifact", default=None, help="the new artifact (default: the rotation record's)")
    b.add_argument("--at", default=None, help="rotation time T (default: the rotation record's): epoch seconds, "
                                              "ISO 8601 or 'now'")
    cat = b.add_mutually_exclusive_group(required=True)
    cat.add_argument("--data", help="the catalogue as a MovieLens-layout directory (item texts)")
    cat.add_argument("--items", help="the catalogue as JSON lines of item events (`trm publish items --file` format)")
    b.add_argument("--bootstrap", default=None, help="Kafka bootstrap for the item_tokens topic "
                                                     "(default $TRM_KAFKA_BOOTSTRAP; none: Feast only)")
    b.add_argument("--batch", type=int, default=512, help="items per encoder call and per part file (default 512)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_backfill)

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


def _refit_table(report: dict, old: str, new: str):
    """One row per (fit, level): the refit beside a refit from scratch and scratch + matching."""
    from rich.table import Table

    t = Table(title=f"refit {old} -> {new} (share of items; from scratch: random init, no matching)")
    for col in ("fit", "level", "code changed", "used", "perplexity", "tuple changed", "collisions", "k-means s"):
        t.add_column(col, justify="left" if col == "fit" else "right")
    for run in ("refit", "scratch", "scratch_matched"):
        if run not in report:
            continue
        r = report[run]
        for lvl in range(len(r["usage"])):
            first = lvl == 0
            t.add_row(run.replace("_", "+") if first else "", str(lvl + 1), f"{r['code_changed'][lvl]:.3f}",
                      f"{r['usage'][lvl]:.3f}", f"{r['perplexity'][lvl]:.1f}",
                      f"{r['tuple_changed']:.3f}" if first else "", f"{r['collision_rate']:.3f}" if first else "",
                      f"{r['seconds']:.2f}" if first else "", end_section=lvl == len(r["usage"]) - 1)
    return t


def cmd_refit(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from streams.movielens import DataError, load_movielens
    from tokenizer.hybrid import ArtifactError, HybridTokenizer, TokenizerError

    console = Console()
    try:
        old = HybridTokenizer.load(args.old, verify_encoder=False)  # refit names the fix for another encoder
        ds = load_movielens(args.data)
    except ArtifactError as exc:
        console.print(f"[red]error:[/red] cannot refit from {args.old}: {exc}")
        return 2
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    cutoff = None
    for name in ("cutoff_quantile", "since_quantile"):
        q = getattr(args, name)
        if q is not None and not 0.0 < q <= 1.0:
            console.print(f"[red]error:[/red] --{name.replace('_', '-')} must be in (0, 1]")
            return 2
    since = ds.time_quantile(args.since_quantile) if args.since_quantile is not None else None  # of the whole log
    if args.cutoff_quantile is not None:
        cutoff = ds.time_quantile(args.cutoff_quantile)
        ds, _ = ds.split(cutoff)
    interactions = ds.interactions if since is None else [i for i in ds.interactions if i.event_time >= since]
    console.print(f"refitting {old.version} on {len(ds.items)} items, {len(interactions)} interactions")
    try:
        tok = HybridTokenizer.refit(old, list(ds.items.values()), interactions, progress=not args.quiet,
                                    fit_cutoff=cutoff, compare_scratch=not args.no_compare)
    except TokenizerError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    out = tok.save(args.out)
    if "scratch" in tok.fit_report:
        console.print(_refit_table(tok.fit_report, old.version, tok.version))
    b = tok.fit_report["bpe"]
    console.print(f"BPE merges: {b['merges_kept']} kept with their ids, {b['merges_new']} new, "
                  f"{b['merges_retired']} retired")
    console.print(f"saved {out} (version {tok.version}, lineage from {old.version})")
    return 0


def parse_time(value: str) -> int:
    """'now', epoch seconds or ISO 8601 (UTC when it names no zone) -> epoch seconds."""
    import time
    from datetime import datetime, timezone

    if value == "now":
        return int(time.time())
    try:
        return int(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not 'now', epoch seconds or ISO 8601") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp())


def cmd_rotate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from streams.rotation import Rotation, RotationError, read_rotation, rotation_path, write_rotation
    from tokenizer.artifact import verify
    from tokenizer.errors import ArtifactError
    from trm.config import feast_repo_path

    console = Console()
    repo = feast_repo_path(args.repo).resolve()
    try:
        at = parse_time(args.at)
        cur = read_rotation(repo)
        new_v = verify(args.artifact)  # hashes the artifact's files: once
        if cur is not None and cur.to_version == new_v and not args.old:
            # the same rotation again (a retried job): keep its T, or a backfill in progress would
            # be stamped at two times
            console.print(f"already recorded in {rotation_path(repo)}: {cur.from_version} -> {cur.to_version} at "
                          f"{cur.at}{' (backfilled)' if cur.backfilled else ''}; nothing changed")
            return 0
        old = args.old or (cur.to_artifact if cur is not None else None)
        if old is None:
            console.print("[red]error:[/red] no rotation recorded yet: pass --from, the artifact the workers run")
            return 2
        old_v = verify(old)
    except (ValueError, RotationError, ArtifactError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if old_v == new_v:
        console.print(f"[red]error:[/red] {args.artifact} is the artifact in use ({new_v}): nothing to rotate")
        return 2
    rot = Rotation(old_v, str(Path(old).resolve()), new_v, str(Path(args.artifact).resolve()), at)
    path = write_rotation(repo, rot)
    console.print(f"recorded {path}: {old_v} -> {new_v} at {at}; item events at or after it get {new_v}'s tokens, "
                  f"user rows at or after it wait for: trm tokenizer backfill --repo {repo} --data|--items …")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import json

    from rich.console import Console

    from streams.backfill import BackfillConfig, backfill, texts_at
    from streams.movielens import DataError
    from streams.publisher import PublishError, events_from_file, item_events
    from streams.rotation import RotationError, read_rotation
    from tokenizer.hybrid import ArtifactError, HybridTokenizer
    from trm.config import feast_repo_path

    console = Console()
    repo = feast_repo_path(args.repo).resolve()
    if not (repo / "feature_store.yaml").exists():
        console.print(f"[red]error:[/red] {repo} is not an applied Feast repo")
        return 2
    try:
        rot = read_rotation(repo)
        artifact = args.artifact or (rot.to_artifact if rot else None)
        at = parse_time(args.at) if args.at else (rot.at if rot else None)
        if artifact is None or at is None:
            console.print("[red]error:[/red] no rotation recorded: pass --artifact and --at, or run "
                          "`trm tokenizer rotate` first")
            return 2
        tok = HybridTokenizer.load(artifact)
        if rot is not None and (rot.to_version != tok.version or rot.at != at):
            console.print(f"[yellow]warning:[/yellow] the rotation record is {rot.to_version} at {rot.at}; "
                          f"backfilling {tok.version} at {at} leaves it unmarked")
        events = item_events(args.data) if args.data else events_from_file(args.items, "items")
    except (ValueError, RotationError, ArtifactError, DataError, PublishError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    publish = _token_publisher(args.bootstrap)
    rep = backfill(BackfillConfig(repo, at, batch=args.batch, progress=not args.quiet), tok,
                   texts_at(events, at), publish)
    console.print(f"backfilled {tok.version} at {at}: {rep.items_written} item rows ({rep.items_current} already "
                  f"current, {len(rep.items_without_text)} without text), {rep.users_written} user rows "
                  f"({rep.users_current} already current) in {rep.seconds:.1f} s")
    if rep.items_without_text:
        console.print(f"[yellow]warning:[/yellow] no catalogue text at or before {at} for items "
                      f"{rep.items_without_text[:10]}{' …' if len(rep.items_without_text) > 10 else ''}: "
                      "they keep their old tokens")
    print(json.dumps(rep.to_dict()))
    return 0


def _token_publisher(bootstrap: str | None):
    """rows -> the item_tokens topic (what the item agent produces), or None without a broker."""
    if not (bootstrap or os.environ.get("TRM_KAFKA_BOOTSTRAP")):
        return None
    from streams.contract.codec import AvroCodec
    from streams.contract.events import ItemTokensEvent
    from streams.contract.topics import ITEM_TOKENS
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_raw_through

    cfg = KafkaConfig.from_env(**({"bootstrap_servers": bootstrap} if bootstrap else {}))
    codec = AvroCodec()

    def publish(rows: list[dict]) -> dict[int, int]:
        return publish_raw_through(cfg, ITEM_TOKENS, [
            (str(r["item_id"]).encode(),
             codec.encode(ItemTokensEvent(r["item_id"], r["gen_tokens"], r["mem_tokens"], r["tokenizer_version"],
                                          r["created_at"], r["event_timestamp"], r["retired"],
                                          r["coarse_tokens"], r["lexical_tokens"]).to_record(), "ItemTokensEvent"))
            for r in rows])
    return publish


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

