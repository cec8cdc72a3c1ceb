"""Reference computations and end-state checks shared by the streaming tests: what the stores must
hold, computed straight from the records, independent of the worker's code."""
from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

import pandas as pd

HISTORY_LEN = 20
RECENT_LEN = 20  # the worker's default recent_len
RECENT_FEATURES = ("recent_item_ids", "recent_gen_tokens", "recent_labels", "last_event_time")


def reference(interactions, gen_of, n=HISTORY_LEN, r=RECENT_LEN):
    """Per user and per item: [(t, state after every event with time <= t)] in event-time order
    (`interactions` in event-time order, ties in publish order)."""
    users: dict[int, list] = defaultdict(list)
    items: dict[int, list] = defaultdict(list)
    ustate: dict[int, dict] = {}
    icount: dict[int, list] = defaultdict(lambda: [0, 0])
    for it in interactions:
        st = ustate.setdefault(it.user_id, {"hist": [], "n": 0, "npos": 0, "recent": []})
        if it.item_id in gen_of:  # user features only for items with tokens
            st["n"] += 1
            if it.label:
                st["npos"] += 1
                st["hist"] = (st["hist"] + [it.item_id])[-n:]
            st["recent"] = (st["recent"] + [(it.item_id, int(it.label))])[-r:] if r else []  # negatives too
            snap = {"hist_item_ids": list(st["hist"]), "hist_gen_tokens": [x for i in st["hist"] for x in gen_of[i]],
                    "user_n_events": st["n"], "user_n_positives": st["npos"],
                    "recent_item_ids": [i for i, _ in st["recent"]],
                    "recent_gen_tokens": [x for i, _ in st["recent"] for x in gen_of[i]],
                    "recent_labels": [lab for _, lab in st["recent"]], "last_event_time": it.event_time}
            tl = users[it.user_id]
            if tl and tl[-1][0] == it.event_time:
                tl[-1] = (it.event_time, snap)
            else:
                tl.append((it.event_time, snap))
        c = icount[it.item_id]
        c[0] += 1
        c[1] += it.label
        tl = items[it.item_id]
        snap = {"item_n_interactions": c[0], "item_n_positives": c[1]}
        if tl and tl[-1][0] == it.event_time:
            tl[-1] = (it.event_time, snap)
        else:
            tl.append((it.event_time, snap))
    return users, items


def state_before(timeline, t):
    """The state a row at `t - 1 µs` must see: the last entry stamped strictly before t."""
    last = None
    for ts, snap in timeline:
        if ts >= t:
            break
        last = snap
    return last


def assert_pit_row(row, users_tl, items_tl) -> bool:
    """A joined row equals the from-scratch state strictly before its event; True if the user had history."""
    t = int(round((row.event_timestamp + timedelta(microseconds=1)).timestamp()))
    u = state_before(users_tl.get(row.user_id, []), t)
    i = state_before(items_tl.get(row.item_id, []), t)
    if u is None:
        assert pd.isna(row.user_n_events)
    else:
        assert (list(row.hist_item_ids), list(row.hist_gen_tokens), row.user_n_events, row.user_n_positives) == \
            (u["hist_item_ids"], u["hist_gen_tokens"], u["user_n_events"], u["user_n_positives"])
        assert (list(row.recent_item_ids), list(row.recent_gen_tokens), list(row.recent_labels),
                row.last_event_time) == tuple(u[k] for k in RECENT_FEATURES)
    if i is None:
        assert pd.isna(row.item_n_interactions)
    else:
        assert (row.item_n_interactions, row.item_n_positives) == (i["item_n_interactions"], i["item_n_positives"])
    return u is not None


def assert_no_label_leak(joined, interactions, gen_of, r=RECENT_LEN) -> int:
    """The trainer's point-in-time join (trainer.pit_join.historical_features, one row per event of
    `interactions`, in their order) shows each event only the user's events of earlier seconds:
    its recent_* are the last `r` of those (never the event itself, nor its label, nor anything
    of its second or later) and last_event_time < its event time, = the newest of them. Returns
    the number of events that had recent events to check."""
    by_user: dict[int, list] = defaultdict(list)
    for k, it in enumerate(interactions):
        if it.item_id in gen_of:
            by_user[it.user_id].append((it.event_time, k, it.item_id, int(it.label)))
    for evs in by_user.values():
        evs.sort()
    assert len(joined) == len(interactions)
    checked = 0
    for it, row in zip(interactions, joined.itertuples(index=False)):
        assert (row.user_id, row.item_id, row.event_time) == (it.user_id, it.item_id, it.event_time)
        before = [e for e in by_user.get(it.user_id, []) if e[0] < it.event_time][-r:] if r else []
        if pd.isna(row.last_event_time):  # no row before it: the user's first second
            assert not [e for e in by_user.get(it.user_id, []) if e[0] < it.event_time]
            assert row.recent_item_ids is None or len(row.recent_item_ids) == 0
            continue
        assert row.last_event_time < it.event_time
        assert row.last_event_time == max(e[0] for e in by_user[it.user_id] if e[0] < it.event_time)
        assert list(row.recent_item_ids) == [e[2] for e in before]
        assert list(row.recent_labels) == [e[3] for e in before]
        assert list(row.recent_gen_tokens) == [x for e in before for x in gen_of[e[2]]]
        checked += bool(before)
    return checked


def reference_pairs(interactions, gen_of, window=5):
    per_user = defaultdict(list)
    pairs = set()
    for it in interactions:
        if it.label and it.item_id in gen_of:
            prev = per_user[it.user_id]
            for p in prev[-window:]:
                if p != it.item_id:
                    pairs.add((min(p, it.item_id), max(p, it.item_id), it.user_id, it.event_time))
            prev.append(it.item_id)
    return pairs


def consume_all(cfg, topic, expect, timeout=20.0):
    """Every record of a topic (assign + seek to beginning: no group, no end_offsets)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**cfg.kafka_python_kwargs(), enable_auto_commit=False, consumer_timeout_ms=1000)
    parts = c.partitions_for_topic(topic) or {0}
    tps = [TopicPartition(topic, p) for p in parts]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out = []
    import time

    deadline = time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=500).values():
            out.extend(recs)
    c.close()
    return out


async def run_worker(settings, publish=None, wait=None):
    from streams.app import StreamWorker

    async with StreamWorker(settings) as w:
        await w.wait_ready()
        if publish is not None:
            await publish(w)
        if wait is not None:
            await w.wait_for(**wait)
        return w.status()
