"""Interaction processor on a real Feast repo, without Kafka: late events, parking, restarts."""
from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest

from streams.codec import AvroCodec
from streams.dlq import SourceRecord
from streams.events import InteractionEvent
from tests.streams_fixtures import feast_repo  # noqa: F401

CODEC = AvroCodec()
TOKENS = {10: [1, 9, 17], 20: [2, 10, 18], 30: [3, 11, 19]}


def rec(part, off, user, item, label, t):
    return SourceRecord("interactions", part, off, str(user).encode(),
                        CODEC.encode(InteractionEvent(f"r{off}", user, item, label, t).to_record(), "InteractionEvent"))


def make(repo, tokens, park_timeout_s=300.0):
    from streams.feast_sink import FeastSink
    from streams.interaction_agent import InteractionProcessor

    p = InteractionProcessor(FeastSink(repo), repo / "state", repo / "pairs", tokens.get, "interactions",
                             history_len=2, park_timeout_s=park_timeout_s)
    p.assign([0, 1])
    return p


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
