"""Interaction and item-stats processors on a real Feast repo, without Kafka: late events, parking,
restarts, the item-keyed repartition between them (`Pipeline` plays the broker and the loops)."""
from __future__ import annotations

from datetime import timedelta

import pandas as pd

from streams.contract.codec import AvroCodec
from streams.contract.events import InteractionEvent
from streams.dlq import SourceRecord

CODEC = AvroCodec()
TOKENS = {10: [1, 9, 17], 20: [2, 10, 18], 30: [3, 11, 19]}


def rec(part, off, user, item, label, t):
    return SourceRecord("interactions", part, off, str(user).encode(),
                        CODEC.encode(InteractionEvent(f"r{off}", user, item, label, t).to_record(), "InteractionEvent"))


BY_ITEM_PARTS = 2


class Pipeline:
    """The interaction processor with the item-stats processor behind it, as the worker's loops run
    them: the interaction batch's forwarded records (res.outputs) are "produced" to an in-memory
    `interactions_by_item` (partition = item_id % 2) before the interaction state is saved; the
    item-stats processor consumes them then (process + save). `replay_outputs` re-sends the last
    batch's records, as a crash between produce and commit would."""

    def __init__(self, inter, stats):
        self.inter, self.stats = inter, stats
        self.pending: list = []
        self.last: list = []
        self.log: dict[int, list] = {p: [] for p in range(BY_ITEM_PARTS)}  # what was "produced"
        stats.assign(list(range(BY_ITEM_PARTS)))
        self.next_off = {p: stats.hwm(p) + 1 for p in range(BY_ITEM_PARTS)}

    def __getattr__(self, name):
        return getattr(self.inter, name)

    def process(self, records):
        r = self.inter.process(records)
        self.pending += r.outputs
        return r

    def _produce_and_count(self, outputs):
        from streams.dlq import SourceRecord as SR

        recs = []
        for k, v in outputs:
            part = int(k) % BY_ITEM_PARTS
            recs.append(SR("interactions_by_item", part, self.next_off[part], k, v))
            self.log[part].append((k, v))
            self.next_off[part] += 1
        r = self.stats.process(recs)
        self.stats.save(r.hwm)
        return r

    def save(self, hwm):
        out, self.pending = self.pending, []
        self.last = out
        self.stats_result = self._produce_and_count(out)
        self.inter.save(hwm)

    def replay_outputs(self):
        return self._produce_and_count(self.last)

    def revoke(self, parts):
        self.inter.revoke(parts)
        self.stats.revoke(list(range(BY_ITEM_PARTS)))


def make_stats(sink, state_dir, allowed_lateness_s=7 * 86400):
    from streams.item_stats_agent import ItemStatsProcessor

    return ItemStatsProcessor(sink, state_dir, "interactions_by_item", allowed_lateness_s=allowed_lateness_s)


def make(repo, tokens, park_timeout_s=300.0):
    from streams.feast_sink import FeastSink
    from streams.interaction_agent import InteractionProcessor

    sink = FeastSink(repo)
    p = InteractionProcessor(sink, repo / "state", repo / "pairs", tokens.get, "interactions",
                             history_len=2, park_timeout_s=park_timeout_s)
    p.assign([0, 1])
    return Pipeline(p, make_stats(sink, repo / "state"))


def hist(sink, view_feats, key, ids_times):
    from streams.feast_sink import to_utc

    edf = pd.DataFrame({key: [i for i, _ in ids_times],
                        "event_timestamp": [to_utc(t) - timedelta(microseconds=1) for _, t in ids_times]})
    return sink.store.get_historical_features(entity_df=edf, features=view_feats).to_df().sort_values(
        "event_timestamp", kind="stable")


def test_late_event_from_another_partition_restamps_later_item_rows(feast_repo):  # noqa: F811
    p = make(feast_repo, TOKENS)
    r = p.process([rec(0, 0, 1, 10, 1, 100), rec(0, 1, 1, 10, 0, 300)])
    p.save(r.hwm)
    # partition 1 lags: its event at t=200 arrives after t=300 was written
    r = p.process([rec(1, 0, 2, 10, 1, 200)])
    p.save(r.hwm)
    h = hist(p.sink, ["item_stats:item_n_interactions", "item_stats:item_n_positives"], "item_id",
             [(10, 100), (10, 101), (10, 201), (10, 301)])
    assert h["item_n_interactions"].fillna(-1).tolist() == [-1, 1, 2, 3]
    assert h["item_n_positives"].fillna(-1).tolist() == [-1, 1, 2, 2]
    assert p.sink.read_online("item_stats", [10])[10] == {"item_n_interactions": 3, "item_n_positives": 2}


def test_parked_until_tokens_arrive_then_applied_in_order_and_overdue_dead_lettered(feast_repo):  # noqa: F811
    tokens = {10: TOKENS[10]}
    p = make(feast_repo, tokens, park_timeout_s=0.5)
    r = p.process([rec(0, 0, 1, 20, 1, 100), rec(0, 1, 1, 10, 1, 110), rec(0, 2, 2, 30, 1, 120)])
    assert r.parked == 3 and r.applied == 0  # user 1's second event waits behind the first
    p.save(r.hwm)
    assert p.commit_positions()[0] == 0  # nothing before the first parked offset is left out of Feast
    tokens[20] = TOKENS[20]
    r = p.retry_parked()
    assert r.applied == 2 and not r.dead
    p.save(r.hwm)
    assert p.commit_positions()[0] == 2
    u = p.sink.read_online("user_history", [1])[1]
    assert u["hist_item_ids"] == [20, 10] and u["hist_gen_tokens"] == TOKENS[20] + TOKENS[10]
    import time

    time.sleep(0.6)
    r = p.retry_parked()
    assert [d.reason.split(":")[0] for d in r.dead] == ["no_tokens"] and r.dead[0].record.offset == 2
    assert r.dead[0].record.value == rec(0, 2, 2, 30, 1, 120).value
    p.save(r.hwm)
    assert p.n_parked() == 0 and p.commit_positions()[0] == 3


def test_restart_skips_applied_offsets_and_keeps_state(feast_repo):  # noqa: F811
    p = make(feast_repo, TOKENS)
    batch = [rec(0, 0, 1, 10, 1, 100), rec(0, 1, 1, 20, 1, 200), rec(0, 2, 1, 30, 1, 300)]
    r = p.process(batch[:2])
    p.save(r.hwm)
    p.revoke([0, 1])
    p2 = make(feast_repo, TOKENS)  # a new owner of the partitions, same state directory
    r = p2.process(batch)  # replay from an older committed offset
    assert r.skipped == 2 and r.applied == 1
    p2.save(r.hwm)
    u = p2.sink.read_online("user_history", [1])[1]
    assert u["user_n_events"] == 3 and u["hist_item_ids"] == [20, 30]  # history_len=2, oldest dropped
    h = hist(p2.sink, ["user_history:user_n_events", "user_history:hist_item_ids"], "user_id",
             [(1, 100), (1, 101), (1, 201), (1, 301)])
    assert h["user_n_events"].fillna(-1).tolist() == [-1, 1, 2, 3]
    assert [list(x) if x is not None else None for x in h["hist_item_ids"]] == [None, [10], [10, 20], [20, 30]]


# -- duplicates, out-of-order users, allowed lateness (compaction) ------------------------------
class RowStore:
    """A stand-in sink: the offline store's view of the rows, one per (view, entity, event time);
    a later write of the same (entity, event time) wins, as the point-in-time join resolves it
    (latest event_timestamp, then latest `created`)."""

    KEYS = {"user_history": "user_id", "item_stats": "item_id"}

    def __init__(self):
        self.rows: dict[tuple[str, int, int], dict] = {}

    def write(self, view, rows):
        for r in rows:
            self.rows[(view, r[self.KEYS[view]], r["event_timestamp"])] = r

    def latest(self, view, eid):
        ts = max(t for v, e, t in self.rows if v == view and e == eid)
        return self.rows[(view, eid, ts)]


def make_fake(state_dir, tokens, allowed_lateness_s, sink=None, history_len=3, recent_len=5, parts=(0, 1)):
    from streams.interaction_agent import InteractionProcessor

    sink = sink or RowStore()
    p = InteractionProcessor(sink, state_dir, None, tokens.get, "interactions", history_len=history_len,
                             recent_len=recent_len, park_timeout_s=1e9, allowed_lateness_s=allowed_lateness_s)
    p.assign(list(parts))
    return Pipeline(p, make_stats(sink, state_dir, allowed_lateness_s))


def step(p, records):
    r = p.process(records)
    p.save(r.hwm)
    return r


def expected_rows(applied, tokens, history_len, recent_len=5):
    """From scratch: every (view, entity, event time) row the accepted events must leave in the store.
    `applied`: (user, item, label, t) in any order; a user's events have distinct times here."""
    from collections import defaultdict

    out = {}
    by_user, by_item = defaultdict(list), defaultdict(list)
    for u, i, lab, t in applied:
        by_user[u].append((t, i, lab))
        by_item[i].append((t, lab))
    for u, evs in by_user.items():
        evs.sort()
        n = npos = 0
        hist: list[int] = []
        for k, (t, i, lab) in enumerate(evs):
            n += 1
            if lab:
                npos += 1
                hist = (hist + [i])[-history_len:]
            recent = evs[max(0, k + 1 - recent_len):k + 1]  # the last R events, negatives too
            out[("user_history", u, t)] = {"user_id": u, "event_timestamp": t, "hist_item_ids": hist,
                                           "hist_gen_tokens": [x for j in hist for x in tokens[j]],
                                           "user_n_events": n, "user_n_positives": npos,
                                           "recent_item_ids": [j for _, j, _ in recent],
                                           "recent_gen_tokens": [x for _, j, _ in recent for x in tokens[j]],
                                           "recent_labels": [lb for _, _, lb in recent], "last_event_time": t}
    for i, evs in by_item.items():
        evs.sort()
        for k, (t, _) in enumerate(evs):
            if k + 1 == len(evs) or evs[k + 1][0] != t:
                out[("item_stats", i, t)] = {"item_id": i, "event_timestamp": t, "item_n_interactions": k + 1,
                                             "item_n_positives": sum(lab for _, lab in evs[:k + 1])}
    return out


def test_duplicates_are_no_ops_everywhere_across_a_restart_and_while_parked(feast_repo):  # noqa: F811
    tokens = dict(TOKENS)
    p = make(feast_repo, tokens)
    r = p.process([rec(0, 0, 1, 10, 1, 100), rec(0, 1, 1, 20, 0, 200), rec(0, 2, 1, 10, 1, 100)])  # a copy in-batch
    assert (r.applied, r.duplicates) == (2, 1)
    p.save(r.hwm)
    p.revoke([0, 1])
    p = make(feast_repo, tokens)  # restarted: the dedup set comes back from the saved state
    r = p.process([rec(0, 3, 1, 10, 1, 100), rec(0, 4, 1, 20, 0, 200),  # a positive and a negative again
                   rec(0, 5, 2, 10, 1, 100),  # another user, same item and time: not a duplicate
                   rec(0, 6, 1, 20, 1, 200),  # same user, item, time, other label: not a duplicate
                   rec(0, 7, 3, 40, 1, 400), rec(0, 8, 3, 40, 1, 400)])  # no tokens for 40: parked once
    assert (r.applied, r.duplicates, r.parked, r.dead) == (2, 3, 1, [])
    p.save(r.hwm)
    p.revoke([0, 1])
    p = make(feast_repo, tokens)
    r = p.process([rec(0, 9, 3, 40, 1, 400)])  # a copy of the parked one, after a restart
    assert (r.duplicates, r.parked) == (1, 0)
    p.save(r.hwm)
    tokens[40] = [4, 12, 20]
    r = p.retry_parked()
    assert r.applied == 1
    p.save(r.hwm)
    u = p.sink.read_online("user_history", [1, 3])
    assert (u[1]["user_n_events"], u[1]["user_n_positives"], u[1]["hist_item_ids"]) == (3, 2, [10, 20])
    assert (u[3]["user_n_events"], u[3]["hist_item_ids"]) == (1, [40])
    items = p.sink.read_online("item_stats", [10, 20, 40])
    assert items == {10: {"item_n_interactions": 2, "item_n_positives": 2},
                     20: {"item_n_interactions": 2, "item_n_positives": 1},
                     40: {"item_n_interactions": 1, "item_n_positives": 1}}
    from streams.pairs import load_pairs

    pairs = load_pairs(feast_repo / "pairs").to_pylist()
    assert pairs == [{"item_a": 10, "item_b": 20, "user_id": 1, "event_time": 200}]  # once, not per copy


def test_out_of_order_user_event_is_inserted_and_later_rows_are_restamped(feast_repo):  # noqa: F811
    p = make(feast_repo, TOKENS)  # history_len=2
    step(p, [rec(0, 0, 1, 10, 1, 100), rec(0, 1, 1, 20, 1, 300)])
    r = step(p, [rec(0, 2, 1, 30, 1, 200)])  # older than the user's newest event, within the horizon
    assert r.applied == 1 and not r.dead
    h = hist(p.sink, ["user_history:user_n_events", "user_history:hist_item_ids", "user_history:hist_gen_tokens"],
             "user_id", [(1, 101), (1, 201), (1, 301)])
    assert h["user_n_events"].tolist() == [1, 2, 3]
    assert [list(x) for x in h["hist_item_ids"]] == [[10], [10, 30], [30, 20]]  # event-time order
    assert list(h["hist_gen_tokens"].iloc[2]) == TOKENS[30] + TOKENS[20]
    u = p.sink.read_online("user_history", [1])[1]
    assert (u["user_n_events"], u["hist_item_ids"]) == (3, [30, 20])
    # the restamped rows survive a restart: the saved detail rebuilds the same state
    p.revoke([0, 1])
    p = make(feast_repo, TOKENS)
    step(p, [rec(0, 3, 1, 10, 0, 250)])
    h = hist(p.sink, ["user_history:user_n_events", "user_history:hist_item_ids"], "user_id",
             [(1, 251), (1, 301)])
    assert h["user_n_events"].tolist() == [3, 4] and [list(x) for x in h["hist_item_ids"]] == [[10, 30], [30, 20]]
    from streams.pairs import load_pairs

    got = {(r["item_a"], r["item_b"], r["event_time"]) for r in load_pairs(feast_repo / "pairs").to_pylist()}
    assert got == {(10, 20, 300), (10, 30, 200), (20, 30, 300)}  # the late positive's pairs both ways


def test_events_beyond_the_allowed_lateness_are_dead_lettered(tmp_path):
    p = make_fake(tmp_path, TOKENS, allowed_lateness_s=1000)
    step(p, [rec(0, 0, 1, 10, 1, 10_000)])
    r = step(p, [rec(0, 1, 2, 20, 1, 8_000),  # 2000 s behind the watermark: late
                 rec(0, 2, 1, 10, 1, 10_000 - 2000),  # same, also for a would-be duplicate
                 rec(0, 3, 1, 30, 1, 9_500),  # 500 s behind: placed exactly
                 rec(1, 0, 3, 20, 1, 8_000)])  # partition 1 has its own watermark: not late
    assert r.applied == 2 and len(r.dead) == 2
    assert [d.record.offset for d in r.dead] == [1, 2]
    reason = r.dead[0].reason
    assert reason.startswith("late: event_time=8000 is 2000 s older than the watermark 10000") and \
        "allowed lateness is 1000 s" in reason
    assert p.sink.latest("item_stats", 20) == {"item_id": 20, "event_timestamp": 8000, "item_n_interactions": 1,
                                               "item_n_positives": 1}
    assert p.sink.latest("user_history", 1)["hist_item_ids"] == [30, 10]
    p.revoke([0, 1])
    p = make_fake(tmp_path, TOKENS, allowed_lateness_s=1000)  # the watermark is part of the saved state
    r = step(p, [rec(0, 4, 4, 10, 0, 8_999)])
    assert [d.reason.split(":")[0] for d in r.dead] == ["late"]


def test_compaction_keeps_memory_and_sqlite_bounded_and_values_exact(tmp_path):
    import random
    import sqlite3

    rnd = random.Random(7)
    H, step_s, n_batches, per_batch = 2_000, 10, 40, 250  # 100k s of event time, 10k events, ~200 in H
    tokens = {i: [i, i + 100] for i in range(1, 31)}
    p = make_fake(tmp_path / "state", tokens, allowed_lateness_s=H)
    applied, off, t, peak, used = [], [0, 0], 1_000, [], set()
    for b in range(n_batches):
        recs = []
        for _ in range(per_batch):
            t += step_s
            u = rnd.randint(1, 40)
            part = u % 2
            te = t - rnd.randint(0, H // 2)  # some out of order, within the horizon
            while (u, te) in used:  # one event per user and time: a history has one order
                te += 1
            used.add((u, te))
            ev = (u, rnd.randint(1, 30), rnd.randint(0, 1), te)
            recs.append(rec(part, off[part], *ev))
            off[part] += 1
            applied.append(ev)
        r = step(p, recs)
        assert not r.dead and r.duplicates == 0
        peak.append(max([sum(st.n_detail()[k] for st in p.states.values()) for k in range(2)]
                        + [sum(st.n_detail()[k] for st in p.stats.states.values()) for k in range(2)]))
        if b == n_batches // 2:  # a restart half-way: the compacted state is what is saved
            sink = p.sink
            p.revoke([0, 1])
            p = make_fake(tmp_path / "state", tokens, allowed_lateness_s=H, sink=sink)
    # memory: the detail holds the events of about one horizon (+ a batch), not all 10k
    assert max(peak) < 3 * (H // step_s + per_batch), peak
    for part in (0, 1):
        db = sqlite3.connect(tmp_path / "state" / f"interactions-p{part}.sqlite")
        n_rows = db.execute("SELECT count(*) FROM item_events").fetchone()[0]  # one row per event of the detail
        db.close()
        assert n_rows < 3 * (H // step_s + per_batch), n_rows
        db = sqlite3.connect(tmp_path / "state" / f"interactions_by_item-p{part}.sqlite")
        n_rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
        db.close()
        assert n_rows < 3 * (H // step_s + per_batch), n_rows
    # values: every row ever written (restamped ones superseding) == the from-scratch computation
    assert p.sink.rows == expected_rows(applied, tokens, history_len=3)


def test_random_duplicates_late_and_parked_events_leave_exact_rows(tmp_path):
    """Property check: shuffled (bounded) arrival, copies, events beyond the horizon, items
    whose tokens come late, a restart; the rows left in the store == the from-scratch ones."""
    import random

    rnd = random.Random(11)
    H = 500
    all_tokens = {i: [i, 50 + i] for i in range(1, 21)}
    tokens = {i: all_tokens[i] for i in range(1, 16)}  # items 16..20 get theirs later
    p = make_fake(tmp_path / "state", tokens, allowed_lateness_s=H)
    wm = {0: -1, 1: -1}
    accepted, seen_keys, used_times = [], set(), set()
    off = [0, 0]
    n_dead = n_dup = 0
    t = 10_000
    for b in range(30):
        recs, evs = [], []
        for _ in range(rnd.randint(1, 60)):
            t += rnd.randint(0, 20)
            u = rnd.randint(1, 12)
            if evs and rnd.random() < 0.1:
                ev = rnd.choice(evs)  # a copy in the same batch
            elif accepted and rnd.random() < 0.1:
                ev = rnd.choice(accepted[-50:])  # a copy of an earlier one
            else:
                lag = rnd.choice([0, 0, 0, rnd.randint(0, H), rnd.randint(H, 3 * H)])
                te = t - lag
                while (u, te) in used_times:  # one event per user and time: histories have one order
                    te += 1
                used_times.add((u, te))
                ev = (u, rnd.randint(1, 20), rnd.randint(0, 1), te)
            evs.append(ev)
            part = ev[0] % 2
            recs.append(rec(part, off[part], *ev))
            off[part] += 1
        # what must happen, simulated independently: event-time order within the batch, late if
        # older than the partition's newest accepted time minus H, a copy of an accepted key is a no-op
        for part, ev in sorted(((ev[0] % 2, ev) for ev in evs), key=lambda x: (x[1][3], x[0])):
            if wm[part] >= 0 and ev[3] < wm[part] - H:
                n_dead += 1
            elif ev in seen_keys:
                n_dup += 1
            else:
                seen_keys.add(ev)
                accepted.append(ev)
                wm[part] = max(wm[part], ev[3])
        r = step(p, recs)
        assert (len(r.dead), r.duplicates) == (n_dead, n_dup), b
        assert all(d.reason.startswith("late: ") for d in r.dead)
        n_dead = n_dup = 0
        if b == 12:
            tokens.update(all_tokens)  # the missing tokens arrive; parked events are placed
            r = p.retry_parked()
            p.save(r.hwm)
        if b in (8, 20):  # restarts: with users parked (their compaction deferred), and without
            sink = p.sink
            p.revoke([0, 1])
            p = make_fake(tmp_path / "state", tokens, allowed_lateness_s=H, sink=sink)
    assert p.n_parked() == 0
    assert p.sink.rows == expected_rows(accepted, all_tokens, history_len=3)


def test_forwarded_copies_from_a_replay_are_dropped_by_the_item_stats_agent(tmp_path):
    """A crash between the produce and the commit re-sends a batch to interactions_by_item: the
    item-stats agent drops the copies (also after its own restart); parked events are forwarded
    when accepted (counters need no tokens), late and duplicate ones are not forwarded at all."""
    tokens = {10: TOKENS[10]}
    p = make_fake(tmp_path, tokens, allowed_lateness_s=1000)
    r = step(p, [rec(0, 0, 1, 10, 1, 5_000), rec(1, 0, 2, 20, 0, 5_010),  # 20: no tokens, parked
                 rec(0, 1, 1, 10, 1, 5_000)])  # a duplicate: not forwarded
    assert (r.applied, r.parked, r.duplicates) == (1, 1, 1) and len(r.outputs) == 2
    assert p.sink.latest("item_stats", 20)["item_n_interactions"] == 1  # counted while parked
    again = p.replay_outputs()
    assert (again.duplicates, again.applied) == (2, 0)
    sink = p.sink
    p.revoke([0, 1])
    p = make_fake(tmp_path, tokens, allowed_lateness_s=1000, sink=sink)
    assert p.replay_outputs().duplicates == 0  # Pipeline forgot its last batch: nothing re-sent
    r = step(p, [rec(0, 2, 3, 10, 0, 5_020), rec(0, 3, 4, 10, 1, 3_000)])  # the second is late: dead
    assert len(r.dead) == 1 and len(r.outputs) == 1
    assert p.replay_outputs().duplicates == 1  # the restarted item-stats state remembers the keys
    assert sink.latest("item_stats", 10) == {"item_id": 10, "event_timestamp": 5_020, "item_n_interactions": 2,
                                             "item_n_positives": 1}


def test_the_high_water_mark_keeps_the_fingerprint_of_its_record(tmp_path):
    """The fingerprint of the record at the high-water mark is saved with the mark, read back by a
    restarted worker, and void with the mark on a log reset (streams/batch_loop._positions compares it
    with the record the log holds there)."""
    from streams.processor import record_mark

    p = make_fake(tmp_path / "state", {10: [1, 9, 17]}, allowed_lateness_s=10**6, parts=(0,))
    recs = [rec(0, k, 1, 10, 1, 1000 + k) for k in range(3)]
    r = p.inter.process(recs)
    assert r.hwm == {0: 2} and r.marks == {0: record_mark(recs[2].key, recs[2].value)}
    p.inter.save(r.hwm, r.marks)
    p.inter.close()
    p.stats.close()
    again = make_fake(tmp_path / "state", {10: [1, 9, 17]}, allowed_lateness_s=10**6, parts=(0,))
    assert again.inter.hwm(0) == 2 and again.inter.hwm_mark(0) == r.marks[0]
    assert again.inter.hwm_mark(0) != record_mark(recs[1].key, recs[1].value)
    again.inter.log_reset(0)
    assert again.inter.hwm(0) == -1 and again.inter.hwm_mark(0) is None
    again.inter.save({0: 0})  # a caller that knows no fingerprint (older code's files) saves none
    again.inter.close()
    again.stats.close()
    last = make_fake(tmp_path / "state", {10: [1, 9, 17]}, allowed_lateness_s=10**6, parts=(0,))
    assert last.inter.hwm(0) == 0 and last.inter.hwm_mark(0) is None


def test_a_fingerprint_counts_only_for_the_offset_it_was_saved_at(tmp_path):
    """Older code (a rollback) advances the high-water mark without knowing of the fingerprint, which then
    describes another record: read back, it is no fingerprint at all (the check on assignment falls back to
    end offsets) rather than a false "log replaced" that would re-read the whole log. A fingerprint saved
    without its offset (the code before it was kept) may be such a stale one, and is not trusted either."""
    import sqlite3
    from contextlib import closing

    from streams.processor import record_mark

    def reopen():
        p = make_fake(tmp_path / "state", {10: [1, 9, 17]}, allowed_lateness_s=10**6, parts=(0,))
        mark = (p.inter.hwm(0), p.inter.hwm_mark(0))
        p.inter.close()
        p.stats.close()
        return mark

    p = make_fake(tmp_path / "state", {10: [1, 9, 17]}, allowed_lateness_s=10**6, parts=(0,))
    recs = [rec(0, k, 1, 10, 1, 1000 + k) for k in range(3)]
    r = p.inter.process(recs)
    p.inter.save(r.hwm, r.marks)
    path = p.inter.state_path(0)
    p.inter.close()
    p.stats.close()
    mark = record_mark(recs[2].key, recs[2].value)
    assert reopen() == (2, mark)
    with closing(sqlite3.connect(path)) as db, db:  # older code's save: the mark moves, its fingerprint stays
        db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', 7)")
    assert reopen() == (7, None)
    with closing(sqlite3.connect(path)) as db, db:  # the previous code's file, in step but without the offset
        db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', 2)")
        db.execute("DELETE FROM meta WHERE k = 'hwm_mark_at'")
    assert reopen() == (2, None)
    p = make_fake(tmp_path / "state", {10: [1, 9, 17]}, allowed_lateness_s=10**6, parts=(0,))
    nxt = rec(0, 3, 1, 10, 1, 1003)
    r = p.inter.process([nxt])  # the next save writes both again
    p.inter.save(r.hwm, r.marks)
    p.inter.close()
    p.stats.close()
    assert reopen() == (3, record_mark(nxt.key, nxt.value))
