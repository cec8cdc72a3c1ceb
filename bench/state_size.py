"""Worker state size: bytes per user and per item held by the interaction agent, by configuration.

Feeds one synthetic stream (bench/scale_bench.py's generator) through the worker's own
`InteractionProcessor` (Avro decode -> state -> Feast writes -> state save with its compaction),
once per (history length, allowed lateness), and sums what tracemalloc attributes to the state
modules (streams/state/*) at the end. What bounds it: per user, the last `history_len`
positives and `recent_len` events, plus the detail of its events inside the allowed lateness
(kept so a late event can be placed exactly); per item, its interned gen-tokens. So the memory is
users x (history + recent) + rate x allowed lateness + items, all set by configuration.

    python bench/state_size.py [--events 60000] [--items 3000]
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale_bench import BATCH, PARTITIONS, generate, interaction_records  # noqa: E402


def measure(d: dict, history_len: int, lateness_s: float) -> dict:
    from streams.contract.codec import AvroCodec
    from streams.feast_sink import FeastSink
    from streams.feature_repo_tools import materialize_repo
    from streams.interaction_agent import InteractionProcessor

    work = Path(tempfile.mkdtemp(prefix="trm-state-size-"))
    sink = FeastSink(materialize_repo(work / "repo"), writer_id="size")
    gen = {i + 1: [i % 256, 256 + i % 251, 512 + i % 241] for i in range(len(d["topic"]))}
    codec = AvroCodec()
    gc.collect()
    tracemalloc.start(1)
    proc = InteractionProcessor(sink, work / "state", None, gen.get, "interactions", history_len=history_len,
                                codec=codec, allowed_lateness_s=lateness_s)
    off = [0] * PARTITIONS
    for lo in range(0, len(d["t"]), BATCH):
        proc.save(proc.process(interaction_records(codec, d, lo, min(lo + BATCH, len(d["t"])), off)).hwm)
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*streams/state/*")])
    tracemalloc.stop()
    state_bytes = sum(s.size for s in snap.statistics("filename"))
    users = sum(len(s.users) for s in proc.states.values())
    items = sum(len(s._tok) for s in proc.states.values())
    detail = sum(s.n_detail()[0] for s in proc.states.values())
    dedup = sum(s.n_detail()[1] for s in proc.states.values())
    return {"history_len": history_len, "allowed_lateness_h": lateness_s / 3600, "users": users, "items": items,
            "detail_events": detail, "dedup_keys": dedup, "state_mb": state_bytes / 2**20,
            "bytes_per_user": state_bytes / max(users, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--items", type=int, default=3_000)
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from trm import quiet_third_party_warnings

    quiet_third_party_warnings()
    d = generate(args.events, args.items, seed=5)
    rows = []
    for hl, late in ((20, 0.0), (20, 86_400.0), (20, 7 * 86_400.0), (50, 0.0), (50, 7 * 86_400.0)):
        t = time.perf_counter()
        rows.append(measure(d, hl, late))
        print(f"history {hl}, lateness {late / 3600:g} h: {rows[-1]['state_mb']:.1f} MB "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    table = Table(title=f"interaction-agent state after {args.events:,} events (tracemalloc, streams/state/*)")
    for c in rows[0]:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" for v in r.values()))
    Console(width=160).print(table)
    # the slope of state with the detail: extra bytes per event kept within the lateness
    base = next(r for r in rows if r["history_len"] == 20 and r["allowed_lateness_h"] == 0)
    week = next(r for r in rows if r["history_len"] == 20 and r["allowed_lateness_h"] == 168)
    per_event = (week["state_mb"] - base["state_mb"]) * 2**20 / max(week["detail_events"] - base["detail_events"], 1)
    print(f"bytes per user (history 20, no lateness): {base['bytes_per_user']:.0f}; "
          f"per detail event kept within the lateness: {per_event:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
