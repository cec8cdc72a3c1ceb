"""End-state checks shared by the fault tests: after a fault and the recovery, the stores must
hold exactly what a from-scratch computation over the same events gives.

`assert_recovered(...)` checks, against the real broker and Feast repo:
  - both dead-letter topics are empty (0 events lost to a DLQ);
  - tokens online == the tokenizer's for every item;
  - every user history and item counter online == a from-scratch computation;
  - point-in-time answers (offline store, every 11th interaction, read at t - 1 µs) == the
    from-scratch state strictly before t: no duplicate row written by a replay changes an answer.
"""
from __future__ import annotations

from datetime import timedelta

import pandas as pd

from tests.stream_checks import assert_pit_row, consume_all, reference

PIT_FEATURES = ["user_history:hist_item_ids", "user_history:hist_gen_tokens", "user_history:user_n_events",
                "user_history:user_n_positives", "item_stats:item_n_interactions", "item_stats:item_n_positives",
                "item_tokens:gen_tokens", "user_history:recent_item_ids", "user_history:recent_gen_tokens",
                "user_history:recent_labels", "user_history:last_event_time"]


def committed_total(cfg, group: str, topic: str) -> int:
    """Sum over partitions of the group's committed offsets (Tansu: ask per partition)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**cfg.kafka_python_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(cfg.topic(topic), p) for p in sorted(c.partitions_for_topic(cfg.topic(topic)) or {0})]
        return sum(c.committed(tp) or 0 for tp in tps)
    finally:
        c.close()


def token_reference(tok, items: dict) -> dict[int, list[int]]:
    return {iid: t.gen_tokens for iid, t in zip(items, tok.encode_texts([i.text() for i in items.values()]))}


def assert_recovered(cfg, repo, items: dict, its: list, tok, every: int = 11) -> int:
    """Assert the recovered end state (see module docstring); return the number of PIT rows checked."""
    from streams.feast_sink import FeastSink, to_utc

    assert consume_all(cfg, "interactions.dlq", 1, timeout=3) == []
    assert consume_all(cfg, "items.dlq", 1, timeout=3) == []
    gen_of = token_reference(tok, items)
    sink = FeastSink(repo)
    online = sink.read_online("item_tokens", list(items))
    assert {iid: online[iid]["gen_tokens"] for iid in items} == gen_of
    assert all(online[i]["mem_tokens"] == t.mem_tokens for i, t in zip(items, tok.encode_items(list(items.values()))))
    users_tl, items_tl = reference(its, gen_of)
    online_u = sink.read_online("user_history", list(users_tl))
    assert {online_u[u].pop("tokenizer_version") for u in users_tl} == {tok.version}  # the artifact of their tokens
    assert {u: online_u[u] for u in users_tl} == {u: tl[-1][1] for u, tl in users_tl.items()}
    online_i = sink.read_online("item_stats", list(items_tl))
    assert {i: online_i[i] for i in items_tl} == {i: tl[-1][1] for i, tl in items_tl.items()}

    sample = its[::every]
    edf = pd.DataFrame({"user_id": [i.user_id for i in sample], "item_id": [i.item_id for i in sample],
                        "event_timestamp": [to_utc(i.event_time) - timedelta(microseconds=1) for i in sample]})
    hist = sink.store.get_historical_features(entity_df=edf, features=PIT_FEATURES).to_df()
    assert len(hist) == len(edf)
    checked = 0
    for row in hist.itertuples(index=False):
        checked += assert_pit_row(row, users_tl, items_tl)
        assert list(row.gen_tokens) == gen_of[row.item_id]
    assert checked > len(sample) // 2
    return checked
