"""A user's recent labelled events (`recent_item_ids`, `recent_gen_tokens`, `recent_labels`) and
`last_event_time` follow every rule of the user's features (streams/state/user_history.py): in
order (`append`), a late event inserted mid-history (`insert`, re-stamping later rows), compaction
into the base (`fold`), and a restart from the SQLite file (`_load`). The real PartitionState is
driven as the interaction agent drives it (accept, apply in event-time order, compact, save), and
every row it ever wrote is compared with a brute-force computation from the raw events: the row
at t is the state after the user's events with event_time <= t, in (event_time, arrival) order."""
from __future__ import annotations

import random

from streams.state import PartitionState

TOKENS = {i: [i, 100 + i, 200 + i] for i in range(1, 13)}  # L = 3 gen-tokens per item


class Driver:
    """One partition's state, fed batches like the interaction agent feeds it."""

    def __init__(self, path, history_len=2, recent_len=4, allowed_lateness_s=1000):
        self.path, self.args = path, (history_len, allowed_lateness_s, recent_len)
        self.rows: dict[tuple[int, int], dict] = {}  # (user, t) -> row; a later write wins (the PIT join's rule)
        self.applied: list[tuple[int, int, int, int, int]] = []  # (user, item, label, t, arrival seq)
        self.seq = 0
        self.hwm = -1
        self.open()

    def open(self):
        hl, lateness, rl = self.args
        self.st = PartitionState(self.path, hl, lateness, recent_len=rl)

    def restart(self):
        self.st.close()
        self.open()

    def batch(self, events):
        """events: (user, item, label, t) in arrival order; applied in (t, arrival) order."""
        todo = []
        for u, i, lab, t in events:
            todo.append((t, self.seq, u, i, lab))
            self.seq += 1
        for t, seq, u, i, lab in sorted(todo):
            assert self.st.late(t) is None, (u, i, t)
            if not self.st.accept(u, i, t, lab):
                continue  # a duplicate: a no-op
            self.st.apply(u, i, lab, t, TOKENS[i], self.rows)
            self.applied.append((u, i, lab, t, seq))
        self.st.compact()
        self.hwm += len(events)
        self.st.save(self.hwm)


def brute_force(applied, history_len, recent_len, tokens=TOKENS):
    """{(user, t): row} from scratch: for every event time t of a user, its events with time <= t."""
    by_user: dict[int, list] = {}
    for u, i, lab, t, seq in applied:
        by_user.setdefault(u, []).append((t, seq, i, lab))
    out = {}
    for u, evs in by_user.items():
        evs.sort()
        for t in {e[0] for e in evs}:
            upto = [e for e in evs if e[0] <= t]
            pos = [e for e in upto if e[3]][-history_len:] if history_len else []
            rec = upto[-recent_len:] if recent_len else []
            out[(u, t)] = {"user_id": u, "event_timestamp": t,
                           "hist_gen_tokens": [x for e in pos for x in tokens[e[2]]],
                           "hist_item_ids": [e[2] for e in pos], "user_n_events": len(upto),
                           "user_n_positives": sum(e[3] for e in upto),
                           "recent_item_ids": [e[2] for e in rec], "recent_gen_tokens": [x for e in rec for x in tokens[e[2]]],
                           "recent_labels": [e[3] for e in rec], "last_event_time": t}
    return out


def current_recent(applied, uid, recent_len):
    """The user's recent list now, as UserState.recent holds it: (item_id, event_time, label, gen_tokens)."""
    evs = sorted((t, seq, i, lab) for u, i, lab, t, seq in applied if u == uid)[-recent_len:]
    return [(i, t, lab, tuple(TOKENS[i])) for t, _, i, lab in evs]


def check(d: Driver):
    hl, _, rl = d.args
    assert d.rows == brute_force(d.applied, hl, rl)
    for uid, u in d.st.users.items():
        assert list(u.recent) == current_recent(d.applied, uid, rl), uid


def test_recent_list_through_append_late_insert_fold_and_restart(tmp_path):
    d = Driver(tmp_path / "interactions-p0.sqlite", history_len=2, recent_len=4, allowed_lateness_s=1000)
    # in order, negatives among them; two events of the same second are one row
    d.batch([(1, 1, 1, 100), (1, 2, 0, 150), (1, 3, 0, 200), (1, 4, 1, 300), (1, 5, 0, 400), (1, 6, 1, 400),
             (2, 1, 0, 120)])
    check(d)
    assert d.rows[(1, 400)]["recent_item_ids"] == [3, 4, 5, 6]
    assert d.rows[(1, 400)]["recent_labels"] == [0, 1, 0, 1]
    assert d.rows[(1, 400)]["recent_gen_tokens"] == TOKENS[3] + TOKENS[4] + TOKENS[5] + TOKENS[6]
    assert d.rows[(1, 150)]["last_event_time"] == 150
    # late: a negative in the middle, and one in an existing second (placed after the one there)
    d.batch([(1, 7, 0, 250), (1, 8, 1, 200)])
    check(d)
    assert d.rows[(1, 300)]["recent_item_ids"] == [3, 8, 7, 4]
    assert d.rows[(1, 300)]["recent_labels"] == [0, 1, 0, 1]
    assert d.rows[(1, 400)]["recent_item_ids"] == [7, 4, 5, 6]  # re-stamped
    # a restart rebuilds the detail from item_events (negatives' tokens included)
    d.restart()
    d.batch([(1, 9, 0, 500)])
    check(d)
    # the watermark moves on: the detail before it - H is folded into the base (recent list too)
    d.batch([(3, 2, 1, 1900), (1, 10, 1, 1950), (2, 3, 1, 2000)])
    check(d)
    u1 = d.st.users[1]
    assert u1.base is not None and [r[0] for r in u1.base[3]] == [4, 5, 6, 9]  # what was folded
    assert [e[1] for e in u1.events] == [10]
    # a late event after the cut: recomputed from the folded base
    d.batch([(1, 11, 0, 1500), (2, 12, 0, 1400)])
    check(d)
    assert d.rows[(1, 1950)]["recent_item_ids"] == [6, 9, 11, 10]
    # the compacted base comes back from the `users` row, and is folded again
    d.restart()
    assert list(d.st.users[1].recent) == current_recent(d.applied, 1, 4)
    d.batch([(1, 12, 1, 3100), (2, 4, 0, 3200), (1, 1, 0, 3300)])
    check(d)
    assert d.st.users[1].base is not None and d.st.users[3].events is None  # user 3: all in its base
    d.restart()
    d.batch([(1, 2, 1, 3400), (2, 5, 1, 3400)])
    check(d)
    assert d.rows[(2, 3400)]["recent_item_ids"] == [12, 3, 4, 5]
    assert d.rows[(2, 3400)]["recent_labels"] == [0, 1, 0, 1]


def test_recent_list_random_events_with_late_ones_restarts_and_compaction(tmp_path):
    rnd = random.Random(5)
    H = 600
    d = Driver(tmp_path / "interactions-p0.sqlite", history_len=3, recent_len=5, allowed_lateness_s=H)
    t = 10_000
    for b in range(40):
        evs = []
        for _ in range(rnd.randint(1, 25)):
            t += rnd.randint(0, 15)
            te = t - rnd.choice([0, 0, rnd.randint(0, H // 2)])  # some late, within the horizon
            evs.append((rnd.randint(1, 8), rnd.randint(1, 12), rnd.randint(0, 1), te))
            if rnd.random() < 0.05:
                evs.append(evs[-1])  # a duplicate
        d.batch(evs)
        if b % 9 == 4:
            d.restart()
    check(d)
    assert sum(1 for u in d.st.users.values() if u.base is not None or u.events is None) > 0
    assert max(len(u.recent) for u in d.st.users.values()) == 5


def test_recent_len_zero_and_a_negative_without_tokens(tmp_path):
    """R = 0 keeps no recent list; a negative applied without tokens (as older code saved them:
    tok = 0) enters the recent list as L x -1, also after a fold and a restart."""
    st = PartitionState(tmp_path / "a.sqlite", 2, 1000, recent_len=0)
    rows: dict = {}
    st.accept(1, 1, 1, 100)
    st.apply(1, 1, 1, 100, TOKENS[1], rows)
    assert rows[(1, 100)]["recent_item_ids"] == [] and rows[(1, 100)]["last_event_time"] == 100
    assert rows[(1, 100)]["hist_item_ids"] == [1]
    st.close()

    st = PartitionState(tmp_path / "b.sqlite", 2, 1000, recent_len=3)
    rows = {}
    for i, lab, t, toks in [(1, 1, 100, TOKENS[1]), (2, 0, 200, None), (3, 0, 300, TOKENS[3])]:
        st.accept(1, i, t, lab)
        st.apply(1, i, lab, t, toks, rows)
    st.compact()
    st.save(2)
    assert rows[(1, 300)]["recent_gen_tokens"] == TOKENS[1] + [-1, -1, -1] + TOKENS[3]
    st.accept(2, 4, 5000, 1)  # moves the watermark: user 1's detail is folded into its base
    st.apply(2, 4, 1, 5000, TOKENS[4], rows)
    st.compact()
    st.save(3)
    assert st.users[1].events is None
    st.close()
    st = PartitionState(tmp_path / "b.sqlite", 2, 1000, recent_len=3)
    assert list(st.users[1].recent) == [(1, 100, 1, tuple(TOKENS[1])), (2, 200, 0, None), (3, 300, 0, tuple(TOKENS[3]))]
    st.accept(1, 5, 5100, 0)
    st.apply(1, 5, 0, 5100, TOKENS[5], rows)
    assert rows[(1, 5100)]["recent_item_ids"] == [2, 3, 5]
    assert rows[(1, 5100)]["recent_gen_tokens"] == [-1, -1, -1] + TOKENS[3] + TOKENS[5]
    assert rows[(1, 5100)]["user_n_events"] == 4 and rows[(1, 5100)]["hist_item_ids"] == [1]
    st.close()
