"""Offline compaction benchmark: one run prints, side by side,

  join     get_historical_features of E entity rows (the trainer's features, all three views)
           over N small part files per view  vs  over the one file `trm compact` leaves
  store    files, rows and bytes before -> after, and the compaction's own seconds

The parts are written the way the stream writes them (FeastSink.write_offline, one part file per
batch) into a real materialized Feast repo (DuckDB offline store) in a temp dir; a fraction of
batches is replayed later with a later `created` (a restarted worker), which compaction drops.
The answers before and after are compared (they must be identical).

    python bench/compaction_bench.py [--parts 2000] [--rows 200] [--entities 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURES = [  # the FeatureService ranker_features (feature_repo/definitions.py) as references
    "item_tokens:gen_tokens", "item_tokens:mem_tokens", "item_tokens:tokenizer_version",
    "item_tokens:created_at", "item_tokens:retired",
    "user_history:hist_gen_tokens", "user_history:hist_item_ids",
    "user_history:user_n_events", "user_history:user_n_positives",
    "item_stats:item_n_interactions", "item_stats:item_n_positives",
]
T0 = 1_200_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_parts(repo: Path, args) -> None:
    import numpy as np
    from tqdm import tqdm

    from streams.feast_sink import FeastSink

    rng = np.random.default_rng(args.seed)
    sink = FeastSink(repo, writer_id="bench")
    created0 = datetime.now(timezone.utc) - timedelta(days=1)
    replay_every = max(1, round(1 / args.replay_frac)) if args.replay_frac > 0 else 0
    for b in tqdm(range(args.parts), desc="writing parts", unit="batch", file=sys.stderr):
        ts = T0 + b * args.rows + np.arange(args.rows)  # event time advances with the stream
        users = rng.integers(0, args.users, args.rows)
        items = rng.integers(0, args.items, args.rows)
        batch = {
            "user_history": [{"user_id": int(u), "hist_gen_tokens": [int(u) % 97, b % 89, 3] * 5,
                              "hist_item_ids": [int(i)] * 5, "user_n_events": b, "user_n_positives": b // 2,
                              "event_timestamp": int(t)} for u, i, t in zip(users, items, ts)],
            "item_stats": [{"item_id": int(i), "item_n_interactions": b, "item_n_positives": b // 3,
                            "event_timestamp": int(t)} for i, t in zip(items, ts)],
            "item_tokens": [{"item_id": int(i), "gen_tokens": [int(i) % 32, 32 + b % 32, 64 + int(i) % 7],
                             "mem_tokens": [int(i) % 511], "tokenizer_version": "bench", "created_at": int(t),
                             "retired": False, "event_timestamp": int(t)} for i, t in zip(items, ts)],
        }
        created = created0 + timedelta(seconds=b)
        for view, rows in batch.items():
            sink.write_offline(view, rows, created)
        if replay_every and b % replay_every == 0:  # a restarted worker re-writes this batch later
            for view, rows in batch.items():
                sink.write_offline(view, rows, created + timedelta(hours=1))
    old = time.time() - 3600  # as if written a while ago: all of them qualify for compaction
    for d in (repo / "data" / "offline").iterdir():
        for p in d.glob("part-*.parquet"):
            os.utime(p, (old, old))


def store_size(repo: Path) -> tuple[int, int, int]:
    import pyarrow.parquet as pq

    files = list((repo / "data" / "offline").glob("*/*.parquet"))
    return len(files), sum(pq.ParquetFile(p).metadata.num_rows for p in files), sum(p.stat().st_size for p in files)


def entity_df(args):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(args.seed + 1)
    t = rng.integers(T0, T0 + args.parts * args.rows, args.entities)
    return pd.DataFrame({"user_id": rng.integers(0, args.users, args.entities),
                         "item_id": rng.integers(0, args.items, args.entities),
                         "event_timestamp": pd.to_datetime(t, unit="s", utc=True) - pd.Timedelta(microseconds=1),
                         "row": range(args.entities)})


def time_join(repo: Path, entity, repeats: int):
    from feast import FeatureStore

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    store = FeatureStore(repo_path=str(repo))
    store.get_historical_features(entity_df=entity.head(10), features=FEATURES).to_df()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = store.get_historical_features(entity_df=entity, features=FEATURES).to_df()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out.sort_values("row").reset_index(drop=True)


def same(a, b) -> bool:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    for col in a.columns:
        la = [x.tolist() if hasattr(x, "tolist") else x for x in a[col]]
        lb = [x.tolist() if hasattr(x, "tolist") else x for x in b[col]]
        if [None if x != x else x for x in la] != [None if x != x else x for x in lb]:  # NaN == NaN
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=2000, help="stream batches = part files per view (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=200, help="rows per part file (default: %(default)s)")
    ap.add_argument("--entities", type=int, default=2000, help="entity rows in the timed join (default: %(default)s)")
    ap.add_argument("--users", type=int, default=5000, help="distinct users (default: %(default)s)")
    ap.add_argument("--items", type=int, default=3000, help="distinct items (default: %(default)s)")
    ap.add_argument("--replay-frac", type=float, default=0.05,
                    help="fraction of batches re-written later with a later `created` (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed joins per side; the median is printed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work directory (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # ibis/duckdb API churn inside Feast

    from rich.console import Console
    from rich.table import Table

    from streams.compaction import compact_repo
    from streams.feature_repo_tools import materialize_repo

    with tempfile.TemporaryDirectory(prefix="trm-compaction-bench-") as tmp:
        repo = materialize_repo(Path(args.work or tmp) / "repo")
        log(f"writing {args.parts} parts x {args.rows} rows into each of 3 views at {repo}")
        write_parts(repo, args)
        files0, rows0, bytes0 = store_size(repo)
        entity = entity_df(args)
        log(f"timing the join of {args.entities} entity rows over {files0} files ({args.repeats} repeats)")
        t_before, before = time_join(repo, entity, args.repeats)
        log("compacting")
        t0 = time.perf_counter()
        merged = sum(r.merged for r in compact_repo(repo, delete_grace_s=0, progress=True))
        t_compact = time.perf_counter() - t0
        files1, rows1, bytes1 = store_size(repo)
        log(f"timing the join over {files1} files")
        t_after, after = time_join(repo, entity, args.repeats)
        identical = same(before, after)

    table = Table(title=f"get_historical_features, {args.entities} entity rows, 11 features from 3 views")
    for col in ("", "before compaction", "after compaction", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("part files (incl. seeds)", f"{files0:,}", f"{files1:,}", f"{files0 / files1:,.0f}x")
    table.add_row("rows", f"{rows0:,}", f"{rows1:,}", f"{rows0 / rows1:.3f}x")
    table.add_row("bytes on disk", f"{bytes0 / 1e6:,.1f} MB", f"{bytes1 / 1e6:,.1f} MB", f"{bytes0 / bytes1:.2f}x")
    table.add_row("join seconds (median)", f"{t_before:.3f}", f"{t_after:.3f}", f"{t_before / t_after:.1f}x faster")
    Console(width=110).print(table)
    print(f"compaction itself: {t_compact:.2f} s for {merged:,} part files; identical join answers: "
          f"{'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
