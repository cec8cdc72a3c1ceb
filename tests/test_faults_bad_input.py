"""Fault injection, bad input: raw bytes of many kinds of malformed or awkward events go to the
real (embedded Tansu) broker; a real worker (tiny tokenizer, real Feast repo) consumes them.

Each kind must end in the dead-letter topic with a `dlq.reason` header, or in a documented,
asserted handling (docs/faults.md) — and the worker must keep processing the good events that
follow. Nothing is silently dropped: counters account for every offset (processed, dead-lettered
or counted as a duplicate).
"""
from __future__ import annotations

import asyncio
import io
import struct

import fastavro
import pytest

from tests.stream_checks import consume_all, run_worker

pytestmark = pytest.mark.integration

U_DUP, U_ORDER = 900_001, 900_002  # users of their own, so their features are easy to read


WHY = {  # a part of the reason each kind must give (docs/faults.md quotes them)
    "truncated avro": "Avro body does not decode", "wrong schema id": "unknown schema id 99",
    "not framed": "magic byte", "empty value": "shorter than the 5-byte Confluent header",
    "wrong record type (interaction on items)": "expected ItemEvent", "empty text": "empty text",
    "non-UTF-8 title": "UnicodeDecodeError", "far-future created_at (ms as s)": "is not epoch seconds",
    "retire of unknown item without text": "no tokens to keep", "trailing garbage": "2 trailing bytes",
    "far-future event_time": "is not epoch seconds", "negative ids": "ids must be positive",
    "label out of range": "label=3 must be 0 or 1", "unknown item": "had no tokens",
}


def _frame(schema_id: int, body: bytes) -> bytes:
    return struct.pack(">bI", 0, schema_id) + body


def test_bad_input_is_dead_lettered_or_handled_and_the_worker_goes_on(kafka_config, feast_repo, tiny_tokenizer,
                                                                        ml_slice):  # noqa: F811
    from streams.app import WorkerSettings
    from streams.contract.codec import AvroCodec
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.feast_sink import FeastSink
    from streams.publisher import publish_kind, publish_raw
    from tokenizer.hybrid import HybridTokenizer

    cfg = kafka_config
    codec = AvroCodec()
    items, its = ml_slice
    tok = HybridTokenizer.load(tiny_tokenizer)
    good_items = list(items.values())[:30]
    good_ids = {i.item_id for i in good_items}
    good_inter = [i for i in its if i.item_id in good_ids][:200]
    a, b = good_items[0], good_items[1]

    item_ok = ItemEvent.from_item(a)
    item_bytes = codec.encode(item_ok.to_record(), "ItemEvent")
    inter_ok = InteractionEvent("ok", 1, a.item_id, 1, 1000)
    inter_bytes = codec.encode(inter_ok.to_record(), "InteractionEvent")

    # -- the bad kinds, (label, key, value, expected reason kind) ----------------------------
    # missing required fields: an InteractionEvent written without event_time/query
    short_schema = fastavro.parse_schema({"type": "record", "name": "Short", "fields": [
        {"name": "request_id", "type": "string"}, {"name": "user_id", "type": "long"},
        {"name": "item_id", "type": "long"}, {"name": "label", "type": "int"}]})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, short_schema, {"request_id": "short", "user_id": 1, "item_id": a.item_id,
                                                   "label": 1})
    # non-UTF-8 bytes inside a string field (same length, so the Avro framing stays intact)
    marked = codec.encode({**item_ok.to_record(), "title": "QQQQ"}, "ItemEvent")
    non_utf8 = marked.replace(b"QQQQ", b"\xff\xfe\xfd\xfc", 1)
    bad_items = [
        ("truncated avro", b"t", item_bytes[: len(item_bytes) // 2], "decode"),
        ("wrong schema id", b"w", _frame(99, item_bytes[5:]), "decode"),
        ("not framed", b"n", b"plain text, no magic byte", "decode"),
        ("empty value", b"e", b"", "decode"),
        ("wrong record type (interaction on items)", b"r", inter_bytes, "decode"),
        ("empty text", b"x", codec.encode({**item_ok.to_record(), "item_id": 777_001, "title": "", "text": "  "},
                                          "ItemEvent"), "invalid"),
        ("non-UTF-8 title", b"u", non_utf8, "decode"),
        ("far-future created_at (ms as s)", b"f", codec.encode(
            {**item_ok.to_record(), "item_id": 777_002, "created_at": 1_700_000_000_000}, "ItemEvent"), "invalid"),
        ("retire of unknown item without text", b"z", codec.encode(
            {**item_ok.to_record(), "item_id": 777_003, "title": "", "text": "", "op": "retire"}, "ItemEvent"),
         "invalid"),
    ]
    bad_inter = [
        ("missing required fields", b"m", _frame(2, buf.getvalue()), "decode"),
        ("wrong types (item body with the interaction schema id)", b"y", _frame(2, item_bytes[5:]), "decode"),
        ("trailing garbage", b"g", inter_bytes + b"\x00\x01", "decode"),
        ("far-future event_time", b"f", codec.encode({**inter_ok.to_record(), "event_time": 10**12},
                                                     "InteractionEvent"), "invalid"),
        ("negative ids", b"i", codec.encode({**inter_ok.to_record(), "user_id": -5}, "InteractionEvent"),
         "invalid"),
        ("label out of range", b"l", codec.encode({**inter_ok.to_record(), "label": 3}, "InteractionEvent"),
         "invalid"),
        ("unknown item", b"k", codec.encode({**inter_ok.to_record(), "user_id": 900_009, "item_id": 88_888_888},
                                            "InteractionEvent"), "no_tokens"),
    ]
    # huge text: ~600 KB of text under the 1 MB request limit — tokenized (the encoder truncates)
    huge = ItemEvent(777_100, "huge " * 1000, "lorem ipsum dolor " * 33_000, ["Drama"], 50, 50)
    # duplicates: the same item event twice; the same positive interaction twice
    dup_item = ItemEvent.from_item(b)
    t0 = min(i.event_time for i in good_inter)
    dup_inter = InteractionEvent("dup", U_DUP, a.item_id, 1, t0 + 10)
    # out of order (across batches): a later event first, then an earlier one
    late_first = InteractionEvent("o2", U_ORDER, b.item_id, 1, t0 + 500)
    early_second = InteractionEvent("o1", U_ORDER, a.item_id, 1, t0 + 100)

    settings = WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer, kafka=cfg, history_len=20,
                              park_timeout_s=3.0, app_id="t-faults")
    n_items = len(good_items) + len(bad_items) + 2  # + the huge item + the repeat of item b
    n_inter_good = len(good_inter)

    async def publish(w):
        pk = lambda *a_: asyncio.to_thread(publish_kind, cfg, *a_, progress=False)  # noqa: E731
        raw = lambda topic, pairs: asyncio.to_thread(publish_raw, cfg, topic, pairs)  # noqa: E731
        await raw("items", [(k, v) for _, k, v, _ in bad_items])
        await pk("items", [ItemEvent.from_item(i) for i in good_items])
        await pk("items", [huge, dup_item])
        await w.wait_for(items=n_items, timeout=120)
        await raw("interactions", [(k, v) for _, k, v, _ in bad_inter])
        await pk("interactions", [dup_inter, dup_inter, late_first])
        # the unknown item parks; the repeat of dup_inter is a duplicate (wait_for counts it too)
        await w.wait_for(interactions=len(bad_inter) - 1 + 2 + 1, timeout=60)
        await _until(lambda: w.loops["interactions"].counters.duplicates == 1, 30)
        await pk("interactions", [early_second])
        await pk("interactions", [InteractionEvent.from_interaction(i) for i in good_inter])
        await w.wait_for(interactions=len(bad_inter) + 3 + n_inter_good + 1, timeout=90)

    status = asyncio.run(run_worker(settings, publish))

    # -- every offset is accounted for; the worker never died and processed the good ones after
    st_i, st_n = status["items"], status["interactions"]
    assert st_i["dead_lettered"] == len(bad_items) and st_i["processed"] == len(good_items) + 2, st_i
    assert st_n["dead_lettered"] == len(bad_inter), st_n
    assert st_n["processed"] == 3 + n_inter_good and st_n["parked"] == 0, st_n
    assert st_n["duplicates"] == 1 and st_n["skipped"] == 0, st_n

    # -- dead letters: original bytes and a reason of the expected kind, one per bad record
    for topic, bad in (("items.dlq", bad_items), ("interactions.dlq", bad_inter)):
        dlq = consume_all(cfg, topic, len(bad))
        assert len(dlq) == len(bad), topic
        got = {r.value: dict(r.headers) for r in dlq}
        for label, _, value, kind in bad:
            h = got[value]
            reason = h["dlq.reason"].decode()
            assert reason.split(":", 1)[0] == kind, (label, reason)
            assert WHY.get(label, "") in reason, (label, reason)
            assert h["dlq.topic"] == topic[:-4].encode()

    # -- documented handlings, read back from Feast
    sink = FeastSink(feast_repo)
    online = sink.read_online("item_tokens", [i.item_id for i in good_items] + [huge.item_id])
    enc = tok.encode_items(good_items)
    for i, t in zip(good_items, enc):  # duplicate item event: same tokens
        assert online[i.item_id]["gen_tokens"] == t.gen_tokens
    assert online[huge.item_id]["gen_tokens"] == tok.encode_texts([huge.text])[0].gen_tokens
    u = sink.read_online("user_history", [U_DUP, U_ORDER])
    # duplicate positive: a no-op everywhere — user features, item counters (and pairs)
    assert u[U_DUP]["hist_item_ids"] == [a.item_id] and u[U_DUP]["user_n_events"] == 1
    # out of order across batches: both counted, the history in event-time order
    assert u[U_ORDER]["user_n_events"] == 2 and u[U_ORDER]["hist_item_ids"] == [a.item_id, b.item_id]
    base = sum(1 for i in good_inter if i.item_id == a.item_id)
    # item counters: the good ones + dup_inter once + early_second
    assert sink.read_online("item_stats", [a.item_id])[a.item_id]["item_n_interactions"] == base + 2
    # point in time: the t0+100 event came after the t0+500 row was written; its own row counts only
    # itself (a read at t0+200 does not see the future), and the t0+500 row was re-stamped (a later
    # `created` supersedes the first one: a read at t0+600 sees both, in event-time order)
    import pandas as pd

    from streams.feast_sink import to_utc
    h = sink.store.get_historical_features(
        entity_df=pd.DataFrame({"user_id": [U_ORDER] * 2, "event_timestamp": [to_utc(t0 + 200), to_utc(t0 + 600)]}),
        features=["user_history:user_n_events", "user_history:hist_item_ids"]).to_df().sort_values("event_timestamp")
    assert h["user_n_events"].tolist() == [1, 2]
    assert [list(x) for x in h["hist_item_ids"]] == [[a.item_id], [a.item_id, b.item_id]]


async def _until(cond, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
