"""`trm compact`: merge the offline store's small parquet part files (streams/compaction.py)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _compact_cmd(args) -> int:
    from rich.console import Console
    from rich.table import Table

    repo = args.repo or os.environ.get("TRM_FEAST_REPO")
    if not repo:
        print("error: no Feast repo: pass --repo DIR or set TRM_FEAST_REPO", file=sys.stderr)
        return 2
    repo = Path(repo)
    if not (repo / "data" / "offline").is_dir():
        print(f"error: {repo} has no data/offline directory (is it a materialized Feast repo?)", file=sys.stderr)
        return 2
    from streams.compaction import compact_repo
    from streams.feast_sink import JOIN_KEYS

    if args.view and args.view not in JOIN_KEYS:
        print(f"error: unknown view {args.view!r}; known: {', '.join(sorted(JOIN_KEYS))}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = compact_repo(repo, [args.view] if args.view else None, min_files=args.min_files,
                           older_than_s=args.older_than, keep_duplicates=args.keep_duplicates,
                           tmp_older_than_s=args.tmp_older_than, delete_grace_s=args.delete_grace,
                           progress=not args.quiet)
    table = Table(title=f"offline compaction of {repo}")
    for col in ("view", "files before", "files after", "rows before", "rows after", "seconds", "note"):
        table.add_column(col, justify="left" if col in ("view", "note") else "right")
    for r in results:
        note = r.skipped or f"merged {r.merged} files into one"
        if r.removed_tmp:
            note += f"; removed {len(r.removed_tmp)} stale temp file(s)"
        table.add_row(r.view, f"{r.files_before:,}", f"{r.files_after:,}", f"{r.rows_before:,}",
                      f"{r.rows_after:,}", f"{r.seconds:.2f}", note)
    Console(width=max(120, Console().width)).print(table)
    fb, fa = sum(r.files_before for r in results), sum(r.files_after for r in results)
    rb, ra = sum(r.rows_before for r in results), sum(r.rows_after for r in results)
    print(f"compacted: files {fb:,} -> {fa:,}, rows {rb:,} -> {ra:,} in {time.perf_counter() - t0:.2f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from streams.compaction import (
        DEFAULT_DELETE_GRACE_S,
        DEFAULT_MIN_FILES,
        DEFAULT_OLDER_THAN_S,
        DEFAULT_TMP_OLDER_THAN_S,
    )

    p = subparsers.add_parser(
        "compact", help="merge the offline store's small parquet part files (run periodically)",
        description="Merge each view's parquet part files older than --older-than into one part file "
                    "(temp name, atomic rename, then delete the inputs), dropping rows that the point-in-time "
                    "join could never pick (same join key and event_timestamp, older `created`). Safe while "
                    "workers write and the trainer reads.")
    p.add_argument("--repo", default=None, help="materialized Feast repo directory (default: $TRM_FEAST_REPO)")
    p.add_argument("--view", default=None, help="compact only this feature view (default: all)")
    p.add_argument("--older-than", type=float, default=DEFAULT_OLDER_THAN_S, metavar="SECONDS",
                   help="merge only part files last modified at least this long ago, leaving in-flight "
                        "writers' fresh files alone (default: %(default)g)")
    p.add_argument("--min-files", type=int, default=DEFAULT_MIN_FILES,
                   help="do nothing for a view with fewer qualifying files (default: %(default)s)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="merge only: keep rows duplicated in (join key, event_timestamp) with an older `created`")
    p.add_argument("--tmp-older-than", type=float, default=DEFAULT_TMP_OLDER_THAN_S, metavar="SECONDS",
                   help="delete temp files (.part-*.tmp) left by killed writers/compactions once this old "
                        "(default: %(default)g)")
    p.add_argument("--delete-grace", type=float, default=DEFAULT_DELETE_GRACE_S, metavar="SECONDS",
                   help="wait this long between publishing the merged file and deleting its inputs, so joins "
                        "already running finish on the files they listed (default: %(default)g)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_compact_cmd)
