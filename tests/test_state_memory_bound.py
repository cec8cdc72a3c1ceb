"""The interaction agent's state memory is bounded by configuration (issue 14): after warm-up, a
steady stream over a growing catalogue leaves the memory the state modules hold flat except for
one interned token entry per new item (legitimate: it follows the catalogue, not the events).

Warm-up: event time spans the allowed lateness H plus two compaction buckets (the detail stops
growing) and every user has `history_len` positives older than the cutoff (its compacted base is
full). The detail is a sawtooth (whole buckets of H/16 expire at once), so memory is compared at
the same phase: right after a compaction moved the cutoff. The per-structure bounds are checked
at every save: history <= history_len, recent <= recent_len, both also in the base, the detail
within one horizon plus a bucket, at most H/B + 2 dedup buckets."""
from __future__ import annotations

import gc
import random
import tracemalloc

from streams.state import PartitionState

H, USERS, HL, RL = 1_600, 100, 5, 4  # bucket B = 100 s; one event per event second


def _tokens(iid: int) -> list[int]:
    return [iid % 7, 7 + iid % 11, 18 + iid % 13]


def _state_bytes() -> int:
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*streams/state/*")])
    return sum(s.size for s in snap.statistics("filename"))


def test_state_memory_is_flat_after_warm_up_but_for_new_items(tmp_path):
    rnd = random.Random(14)
    st = PartitionState(tmp_path / "p0.sqlite", HL, H, recent_len=RL)
    B = st.bucket_s
    # a user's positives arrive at 0.4 / USERS per second: HL of them take HL * USERS / 0.4 s
    warm = H + 2 * B + int(HL * USERS / 0.4) + B
    end = warm + 8 * H
    marks: list[tuple[int, int, int]] = []  # (t, state bytes, items interned) right after a compaction
    tracemalloc.start(1)
    try:
        t, n_new, last_cut = 1_000_000, 0, -1
        t0 = t
        for _ in range(end // 50):
            rows: dict = {}
            for _ in range(50):  # a batch: 50 events, one per event second, each user at random
                t += 1
                if (t - t0) % 40 == 0:  # a new item every 40 s; 20 % of events go to the 20 newest
                    n_new += 1
                newest = 1_000 + n_new
                iid = newest - rnd.randrange(20) if rnd.random() < 0.2 else 1 + int(500 * rnd.random() ** 3)
                uid, label = rnd.randrange(1, USERS + 1), int(rnd.random() < 0.4)
                assert st.late(t) is None and st.accept(uid, iid, t, label)
                st.apply(uid, iid, label, t, _tokens(iid), rows)
            st.compact()
            st.save()
            # the bounds, at every save
            for u in st.users.values():
                assert len(u.history) <= HL and len(u.recent) <= RL
                if u.base is not None:
                    assert len(u.base[2]) <= HL and len(u.base[3]) <= RL
            detail, keys = st.n_detail()
            assert detail == keys <= H + B + 50
            assert len(st._ubuckets) <= H // B + 2
            if st.user_cutoff != last_cut:
                last_cut = st.user_cutoff
                if t - t0 >= warm and (last_cut // B) % 4 == 0:  # every 4th compaction: same phase, cheaper
                    marks.append((t, _state_bytes(), len(st._tok)))
    finally:
        tracemalloc.stop()
        st.close()
    assert len(marks) >= 8, marks
    (t_a, b_a, i_a), (t_b, b_b, i_b) = marks[1], marks[-1]
    per_item = 600  # an interned entry: (list, tuple, vid) + its dict slot, generously
    assert i_b > i_a  # the catalogue grew over the window
    growth = b_b - b_a
    assert growth <= (i_b - i_a) * per_item + 16_384, (
        f"state grew {growth:,} B over {t_b - t_a:,} s of event time after warm-up with "
        f"{i_b - i_a} new items: {marks}")
