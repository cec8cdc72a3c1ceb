"""Integration: real Tansu broker, real Feast repo (SQLite online, DuckDB offline) in a temp dir,
a real (tiny) tokenizer; publish items and interactions, run the worker, check the stores.

Expected values come from a reference computed here straight from the records, independent of
the worker's code: exact tokens, histories, counters, point-in-time rows, dead letters, pairs.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pandas as pd
import pytest

from tests.stream_checks import (
    HISTORY_LEN,
    assert_no_label_leak,
    assert_pit_row,
    consume_all,
    reference,
    reference_pairs,
    run_worker,
)

pytestmark = pytest.mark.integration

UNKNOWN_ITEM, UNKNOWN_USER = 99_999_999, 999_999


def test_worker_end_to_end(kafka_config, feast_repo, tiny_tokenizer, ml_slice, tmp_path):  # noqa: F811
    from streams.app import WorkerSettings
    from streams.contract.codec import AvroCodec
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.feast_sink import FeastSink, to_utc
    from streams.pairs import load_pairs
    from streams.publisher import publish_kind, publish_raw
    from tokenizer.lexical import lexical_tokens
    from tokenizer.hybrid import HybridTokenizer

    cfg = kafka_config
    items, its = ml_slice
    tok = HybridTokenizer.load(tiny_tokenizer)
    expected_tokens = {iid: t for iid, t in zip(items, tok.encode_texts([it.text() for it in items.values()]))}
    gen_of = {iid: t.gen_tokens for iid, t in expected_tokens.items()}

    by_created = sorted(items.values(), key=lambda i: (i.created_at, i.item_id))
    late = by_created[-5:]  # published only after their interactions: those interactions park
    early_events = [ItemEvent.from_item(i) for i in by_created[:-5]]
    late_events = [ItemEvent.from_item(i) for i in late]
    inter = [InteractionEvent.from_interaction(i) for i in its]
    t_end = max(i.event_time for i in its)
    unknown = InteractionEvent("unknown-item", UNKNOWN_USER, UNKNOWN_ITEM, 1, t_end)
    codec = AvroCodec()
    bad_interactions = [
        (b"1", b"not avro at all"),
        (b"1", codec.encode({**InteractionEvent("bad-label", 1, its[0].item_id, 0, 10).to_record(), "label": 7},
                            "InteractionEvent")),
        (b"1", codec.encode(early_events[0].to_record(), "ItemEvent")),  # wrong type on this topic
    ]
    bad_items = [(b"5", b"\x00\x00\x00\x00\x01\xff\xff")]
    retired = by_created[0]
    retire_event = ItemEvent.from_item(retired, op="retire", event_time=t_end + 100)

    settings = WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer, kafka=cfg,
                              history_len=HISTORY_LEN, park_timeout_s=6.0, app_id="t-e2e")

    async def publish(w):
        await asyncio.to_thread(publish_kind, cfg, "items", early_events, progress=False)
        await asyncio.to_thread(publish_raw, cfg, "items", bad_items)
        await asyncio.to_thread(publish_kind, cfg, "interactions", inter + [unknown], progress=False)
        await asyncio.to_thread(publish_raw, cfg, "interactions", bad_interactions)
        await w.wait_for(items=len(early_events) + 1, timeout=60)
        # interactions of the late items (and later ones of the same users) wait for tokens
        for _ in range(100):
            if w.loops["interactions"].counters.parked > 0 and w.loops["interactions"].counters.batches:
                break
            await asyncio.sleep(0.1)
        assert w.loops["interactions"].counters.parked > 0
        await asyncio.to_thread(publish_kind, cfg, "items", late_events, progress=False)
        await w.wait_for(items=len(items) + 1, interactions=len(inter) + 1 + len(bad_interactions), timeout=60)
        await asyncio.to_thread(publish_kind, cfg, "items", [retire_event], progress=False)
        await w.wait_for(items=len(items) + 2, timeout=30)

    status = asyncio.run(run_worker(settings, publish))
    assert status["items"]["processed"] == len(items) + 1 and status["items"]["dead_lettered"] == 1
    assert status["interactions"]["processed"] == len(inter)
    assert status["interactions"]["dead_lettered"] == len(bad_interactions) + 1
    assert status["interactions"]["parked"] == 0

    sink = FeastSink(feast_repo)
    # -- item tokens online: exactly what the tokenizer gives; retired is marked, not forgotten
    online = sink.read_online("item_tokens", list(items))
    for iid, t in expected_tokens.items():
        row = online[iid]
        assert row["gen_tokens"] == t.gen_tokens and row["mem_tokens"] == t.mem_tokens
        assert row["tokenizer_version"] == tok.version and row["created_at"] == items[iid].created_at
        assert row["retired"] is (iid == retired.item_id)
        assert row["lexical_tokens"] == lexical_tokens(items[iid].genres, items[iid].title)  # the item event's categories

    # -- user features and item counters online == the reference's final state
    users_tl, items_tl = reference(its, gen_of)
    items_tl[UNKNOWN_ITEM] = [(t_end, {"item_n_interactions": 1, "item_n_positives": 1})]
    online_u = sink.read_online("user_history", list(users_tl))
    for uid, tl in users_tl.items():
        assert online_u[uid].pop("tokenizer_version") == tok.version, uid  # the artifact of the row's tokens
        assert online_u[uid] == tl[-1][1], uid
    online_i = sink.read_online("item_stats", list(items_tl))
    for iid, tl in items_tl.items():
        assert online_i[iid] == tl[-1][1], iid
    assert sink.read_online("user_history", [UNKNOWN_USER])[UNKNOWN_USER]["user_n_events"] is None

    # -- point in time: a row at t - 1 µs sees only state from events strictly before t
    sample = its[::7]
    edf = pd.DataFrame({"user_id": [i.user_id for i in sample] + [UNKNOWN_USER],
                        "item_id": [i.item_id for i in sample] + [UNKNOWN_ITEM],
                        "event_timestamp": [to_utc(i.event_time) - timedelta(microseconds=1) for i in sample]
                        + [to_utc(0)]})
    feats = ["user_history:hist_item_ids", "user_history:hist_gen_tokens", "user_history:user_n_events",
             "user_history:user_n_positives", "item_stats:item_n_interactions", "item_stats:item_n_positives",
             "item_tokens:gen_tokens", "item_tokens:retired", "user_history:recent_item_ids",
             "user_history:recent_gen_tokens", "user_history:recent_labels", "user_history:last_event_time"]
    hist = sink.store.get_historical_features(entity_df=edf, features=feats).to_df()
    assert len(hist) == len(edf)  # no entity row dropped
    hist = hist.sort_values("event_timestamp", kind="stable")
    n_with_history = 0
    for row in hist.itertuples(index=False):
        if row.user_id == UNKNOWN_USER:
            assert pd.isna(row.user_n_events) and pd.isna(row.item_n_interactions) and row.gen_tokens is None
            continue
        n_with_history += assert_pit_row(row, users_tl, items_tl)
        # items are published 60 s before their first rating: tokens are there, not yet retired
        assert list(row.gen_tokens) == gen_of[row.item_id] and not row.retired
    assert n_with_history > len(sample) // 2

    # -- no label leak through the trainer's join (the ranker_features service): for every event,
    #    recent_* hold only the user's events of earlier seconds, and last_event_time < its time
    from trainer.pit_join import events_frame, historical_features

    joined = historical_features(sink.store, events_frame(its))
    assert assert_no_label_leak(joined, its, gen_of) > len(its) // 2

    # -- item tokens in time: absent before created_at, retired only from the retire event on
    rid = retired.item_id
    edf = pd.DataFrame({"item_id": [rid] * 3, "event_timestamp": [
        to_utc(retired.created_at) - timedelta(microseconds=1), to_utc(retire_event.event_time) - timedelta(microseconds=1),
        to_utc(retire_event.event_time)]})
    h = sink.store.get_historical_features(entity_df=edf, features=["item_tokens:gen_tokens", "item_tokens:retired"]
                                           ).to_df().sort_values("event_timestamp")
    assert h["gen_tokens"].iloc[0] is None and list(h["gen_tokens"].iloc[2]) == gen_of[rid]
    assert list(h["retired"].iloc[1:]) == [False, True]

    # -- dead letters: original bytes + reason headers; the item_tokens output topic
    dlq = consume_all(cfg, "interactions.dlq", 4)
    assert sorted(r.value for r in dlq) == sorted([v for _, v in bad_interactions] + [codec.encode(
        unknown.to_record(), "InteractionEvent")])
    reasons = sorted(dict(r.headers)["dlq.reason"].decode().split(":")[0] for r in dlq)
    assert reasons == ["decode", "decode", "invalid", "no_tokens"]
    assert all(dict(r.headers)["dlq.topic"] == b"interactions" for r in dlq)
    items_dlq = consume_all(cfg, "items.dlq", 1)
    assert [r.value for r in items_dlq] == [bad_items[0][1]]
    out = consume_all(cfg, "item_tokens", len(items) + 1)
    assert len(out) == len(items) + 1
    last = codec.decode(out[-1].value) if out[-1].key == str(rid).encode() else None
    assert any(codec.decode(r.value)["retired"] for r in out) and (last is None or last["retired"])

    # -- committed offsets of the worker's group: everything (what a reader gating on them relies on)
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**cfg.kafka_python_kwargs(), group_id="t-e2e-interactions", enable_auto_commit=False)
    tps = [TopicPartition("interactions", p) for p in sorted(c.partitions_for_topic("interactions"))]
    committed = sum(c.committed(tp) or 0 for tp in tps)  # explicit partitions: Tansu cannot list them all
    c.close()
    assert committed == len(inter) + 1 + len(bad_interactions)

    # -- co-interaction pairs for the tokenizer's alignment
    got = load_pairs(feast_repo / "data" / "pairs")
    got_set = set(zip(got["item_a"].to_pylist(), got["item_b"].to_pylist(), got["user_id"].to_pylist(),
                      got["event_time"].to_pylist()))
    assert got_set == reference_pairs(its, gen_of)

    # -- replay 1: a new consumer group over the same saved state (the broker lost the group's
    #    offsets) resumes after the saved high-water marks (batch_loop._position; anything at or
    #    below them that was fetched before the seek is skipped): the log still reaches past them,
    #    so it is no log reset, and nothing is applied again
    before_u = sink.read_online("user_history", list(users_tl))
    before_i = sink.read_online("item_stats", list(items_tl))
    n_inter = len(inter) + 1 + len(bad_interactions)
    replay = WorkerSettings(repo_path=feast_repo, kafka=cfg, agents=("interactions",), app_id="t-replay1",
                            history_len=HISTORY_LEN)

    async def linger(w):
        await asyncio.sleep(3)

    st = asyncio.run(run_worker(replay, publish=linger))
    assert st["interactions"]["log_resets"] == 0
    assert st["interactions"]["processed"] == 0 and st["interactions"]["duplicates"] == 0
    assert sink.read_online("user_history", list(users_tl)) == before_u
    # -- replay 2: state lost (fresh state dir): recomputed from the log, identical values
    replay2 = WorkerSettings(repo_path=feast_repo, kafka=cfg, agents=("interactions",), app_id="t-replay2",
                             history_len=HISTORY_LEN, state_dir=tmp_path / "state2", pairs_dir=tmp_path / "pairs2",
                             park_timeout_s=6.0)
    st = asyncio.run(run_worker(replay2, wait={"interactions": n_inter}))
    assert st["interactions"]["processed"] == len(inter)
    sink2 = FeastSink(feast_repo)
    assert sink2.read_online("user_history", list(users_tl)) == before_u
    assert sink2.read_online("item_stats", list(items_tl)) == before_i
    hist2 = sink2.store.get_historical_features(entity_df=edf, features=["item_tokens:gen_tokens"]).to_df()
    assert len(hist2) == 3
