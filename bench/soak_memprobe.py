"""Soak memory probe: where does the interaction agent's memory go under the soak's stream?

Feeds the soak's synthetic interactions (bench/soak.py `EventSource`, same users/items/labels and
compressed event time) straight into the worker's `InteractionProcessor` in this process — the
same code from Avro decode to the Feast/parquet writes and the state save (with its compaction),
only without Kafka — one batch per simulated wall second, tracemalloc on. At every tenth it prints
this process's RSS, Python's traced memory and the detail the partition states hold
(`PartitionState.n_detail`: user detail events, dedup keys); at the end, the
source lines whose allocations grew most from 10 % and from 50 % of the run to its end, and the
slopes after warm-up.

Warm-up ends once (a) event time spans the allowed lateness plus two compaction buckets (H + H/8:
the detail stops growing) and (b) every user's compacted base holds its full history: `history_len`
positives older than the cutoff, which takes history_len x users / (rate x label rate) more
(20 x 5,000 / 800 = 125 s); 462 s at the defaults. The detail is a sawtooth between rate x H and
rate x (H + H/16) events (whole buckets expire), so besides a sample every 10 simulated seconds
the probe takes one right after every compaction that moved the cutoff (same phase of the
sawtooth). Slopes (least squares, per simulated minute = per soak minute) after warm-up: RSS,
traced memory, the detail, and the catalogue's growth beside them (items interned: legitimate, one
entry per new item and partition).

    python bench/soak_memprobe.py [--seconds 600] [--rate 2000] [--time-scale 2016] [--no-trace]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from soak import DATA, EventSource  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=600, help="simulated wall seconds (one batch each)")
    ap.add_argument("--rate", type=int, default=2000, help="interactions per simulated second")
    ap.add_argument("--time-scale", type=float, default=2016.0, help="event seconds per simulated second")
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--allowed-lateness", type=float, default=None, help="event seconds (default: the worker's)")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="RSS and detail counts only")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="glibc: malloc_trim(0) before every sample (what RSS is once freed heap goes back)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)

    import psutil
    import pyarrow as pa

    from streams.contract.codec import AvroCodec
    from streams.dlq import SourceRecord
    from streams.feast_sink import FeastSink
    from streams.feature_repo_tools import materialize_repo
    from streams.interaction_agent import InteractionProcessor
    from streams.movielens import load_movielens
    from streams.state import DEFAULT_ALLOWED_LATENESS_S

    work = Path(tempfile.mkdtemp(prefix="trm-soak-probe-"))
    repo = materialize_repo(work / "repo")
    ds = load_movielens(DATA)
    src = EventSource(sorted(ds.items.values(), key=lambda i: i.item_id), args.items, args.users, 0.4, 0.05, 0.0)
    H = DEFAULT_ALLOWED_LATENESS_S if args.allowed_lateness is None else args.allowed_lateness
    proc = InteractionProcessor(FeastSink(repo, writer_id="probe"), work / "state", work / "pairs",
                                lambda iid: [iid % 32, 32 + iid % 31, 64 + iid % 29], "interactions",
                                allowed_lateness_s=H)
    label_rate = 0.4  # EventSource's (above)
    warm = ((H + 2 * max(1, int(H) // 16)) / args.time_scale
            + proc.history_len * args.users / (args.rate * label_rate))  # simulated s: see the docstring
    codec = AvroCodec()
    offsets = [0] * args.partitions
    me = psutil.Process()
    base = int(time.time())
    if args.trace:
        tracemalloc.start(1)
    snaps: list = []  # (simulated s, snapshot) at 10 % and at half of the run
    samples: list[tuple] = []  # (simulated s, RSS MB, traced MB, user detail, items interned, anon RSS MB)
    heaps: list = []  # glibc malloc (heap MB, in use MB, free MB) per sample, or None
    phase: list[tuple] = []  # (simulated s, RSS MB, user detail) right after a compaction moved the cutoff
    t0 = time.perf_counter()
    print(f"{'sim s':>6} {'events':>10} {'RSS MB':>8} {'traced MB':>10} {'user detail':>12} "
          f"{'dedup keys':>11} {'users':>7} {'items':>7} {'wall s':>7} {'pymalloc MB':>12} {'in blocks MB':>12} "
          f"{'malloc MB':>10} {'arrow MB':>9} {'anon MB':>8}")
    for s in range(1, args.seconds + 1):
        et = base + int(s * args.time_scale)
        src.new_item(et, float(s))
        recs = []
        for ev in src.interactions(args.rate, et, float(s)):
            p = ev.user_id % args.partitions
            recs.append(SourceRecord("interactions", p, offsets[p], str(ev.user_id).encode(),
                                     codec.encode(ev.to_record(), "InteractionEvent")))
            offsets[p] += 1
        res = proc.process(recs)
        cuts = [st.user_cutoff for st in proc.states.values()]
        proc.save(res.hwm)
        if cuts != [st.user_cutoff for st in proc.states.values()]:
            phase.append((s, me.memory_info().rss / 2**20, sum(st.n_detail()[0] for st in proc.states.values()),
                          _rss_anon()))
        if s % 10 == 0:
            heap = _mallinfo()  # (heap MB, in use MB, free MB) before any trim
            if args.malloc_trim and heap is not None:
                _LIBC.malloc_trim(0)
            heaps.append(heap)
            samples.append((s, me.memory_info().rss / 2**20,
                            tracemalloc.get_traced_memory()[0] / 2**20 if args.trace else float("nan"),
                            sum(st.n_detail()[0] for st in proc.states.values()),
                            sum(len(st._tok) for st in proc.states.values()), _rss_anon()))
        if s % max(1, args.seconds // 10) == 0 or s == args.seconds:
            det = [st.n_detail() for st in proc.states.values()]
            traced = tracemalloc.get_traced_memory()[0] / 2**20 if args.trace else float("nan")
            print(f"{s:>6} {s * args.rate:>10,} {me.memory_info().rss / 2**20:>8.1f} {traced:>10.1f} "
                  f"{sum(d[0] for d in det):>12,} {sum(d[1] for d in det):>11,} "
                  f"{sum(len(st.users) for st in proc.states.values()):>7,} "
                  f"{sum(len(st._tok) for st in proc.states.values()):>7,} {time.perf_counter() - t0:>7.0f} "
                  f"{_pymalloc():>12} {_mallinfo_col():>10} {pa.total_allocated_bytes() / 2**20:>9.1f} "
                  f"{_rss_anon():>8.1f}",
                  flush=True)
            if args.trace and (not snaps or (len(snaps) == 1 and s >= args.seconds // 2)):
                snaps.append((s, tracemalloc.take_snapshot()))
    after = [x for x in samples if x[0] >= warm]
    if len(after) >= 3:
        import numpy as np

        x = np.array([a[0] for a in after], float) / 60  # simulated minutes
        slope = lambda k: np.polyfit(x, [a[k] for a in after], 1)[0]  # noqa: E731
        h = [hp for a, hp in zip(samples, heaps) if a[0] >= warm and hp is not None]
        if h:
            print(f"\nglibc malloc after warm-up: heap {h[0][0]:.1f} -> {h[-1][0]:.1f} MB, in use "
                  f"{h[0][1]:.1f} -> {h[-1][1]:.1f} MB, free in the heap {h[0][2]:.1f} -> {h[-1][2]:.1f} MB"
                  f"{' (before each trim)' if args.malloc_trim else ''}")
        print(f"\nafter warm-up ({after[0][0]} s -> {after[-1][0]} s simulated, {len(after)} samples; "
              f"H = {H / 86_400:g} d at {args.time_scale:g}x): RSS {slope(1):+.2f} MB/min "
              f"({after[0][1]:.1f} -> {after[-1][1]:.1f} MB), of it anonymous {slope(5):+.2f} MB/min "
              f"({after[0][5]:.1f} -> {after[-1][5]:.1f} MB), traced {slope(2):+.2f} MB/min, "
              f"user detail {slope(3):+,.0f} events/min ({min(a[3] for a in after):,} - "
              f"{max(a[3] for a in after):,}), items interned {slope(4):+,.0f}/min")
        ph = [x for x in phase if x[0] >= warm]
        if len(ph) >= 3:
            xp = np.array([a[0] for a in ph], float) / 60
            print(f"right after each compaction ({len(ph)} samples, {ph[0][0]} s -> {ph[-1][0]} s): RSS "
                  f"{np.polyfit(xp, [a[1] for a in ph], 1)[0]:+.2f} MB/min ({ph[0][1]:.1f} -> {ph[-1][1]:.1f} MB), "
                  f"anonymous {np.polyfit(xp, [a[3] for a in ph], 1)[0]:+.2f} MB/min, "
                  f"user detail {min(a[2] for a in ph):,} - {max(a[2] for a in ph):,}")
    else:
        print(f"\nno slope: the run ends before warm-up does ({warm:.0f} s simulated)")
    if args.trace and snaps:
        end = tracemalloc.take_snapshot()
        filt = [tracemalloc.Filter(False, tracemalloc.__file__)]
        for s0, snap in snaps:
            print(f"\ntop {args.top} source lines by growth of live allocations, {s0} s -> {args.seconds} s "
                  f"(simulated):")
            for st in end.filter_traces(filt).compare_to(snap.filter_traces(filt), "lineno")[:args.top]:
                fr = st.traceback[0]
                print(f"  {st.size_diff / 2**20:+8.2f} MB  {st.count_diff:+10,} blocks  "
                      f"{os.path.relpath(fr.filename, ROOT)}:{fr.lineno}")
    return 0


try:  # glibc's allocator statistics and trim (None elsewhere)
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6")

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):
    _LIBC = None


def _pymalloc() -> str:
    """pymalloc's arenas and the bytes in their allocated blocks, MB (sys._debugmallocstats, which
    writes to the C stderr: captured through a temp file)."""
    import re

    fd = sys.stderr.fileno()
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(fd)
        sys.stderr.flush()
        os.dup2(f.fileno(), fd)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, fd)
            os.close(saved)
        f.seek(0)
        text = f.read()
    arenas = re.search(r"arenas \* \d+ bytes/arena\s+=\s+([\d,]+)", text)
    blocks = re.search(r"# bytes in allocated blocks\s+=\s+([\d,]+)", text)
    if not arenas or not blocks:
        return f"{'?':>12} {'?':>12}"
    mb = lambda m: int(m.group(1).replace(",", "")) / 2**20  # noqa: E731
    return f"{mb(arenas):>12.1f} {mb(blocks):>12.1f}"


def _rss_anon() -> float:
    """Anonymous resident memory, MB (/proc/self/status RssAnon): RSS less the file-backed pages
    (shared libraries' code, faulted in as new code paths run) and shared memory; nan elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _mallinfo_col() -> str:
    m = _mallinfo()
    return "?" if m is None else f"{m[1]:.1f}"


def _mallinfo() -> tuple[float, float, float] | None:
    """glibc malloc: (heap incl. mmapped chunks, in use, free inside the heap) in MB."""
    if _LIBC is None:
        return None
    m = _LIBC.mallinfo2()
    return (m.arena + m.hblkhd) / 2**20, (m.uordblks + m.hblkhd) / 2**20, m.fordblks / 2**20


if __name__ == "__main__":
    sys.exit(main())
