"""Unit tests: Avro codec with Confluent framing, local registry, schema evolution, event validation."""
from __future__ import annotations

import struct

import pytest

from streams.contract.codec import AvroCodec, DecodeError
from streams.contract.events import InteractionEvent, InvalidEvent, ItemEvent, ItemTokensEvent
from streams.contract.registry import SchemaRegistry, default_registry

ITEM_V1, INTERACTION_V1, TOKENS_V1, ITEM_V2, TOKENS_V2, TOKENS_V3 = 1, 2, 3, 4, 6, 7


@pytest.fixture(scope="module")
def codec():
    return AvroCodec()


def item_rec(**kw):
    return {**ItemEvent(7, "Heat (1995)", "Heat (1995). Genres: Crime", ["Crime"], 100, 100).to_record(), **kw}


def test_framing_is_magic_zero_and_big_endian_schema_id(codec):
    data = codec.encode(InteractionEvent("r1", 3, 7, 1, 1000).to_record(), "InteractionEvent")
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5])[0] == INTERACTION_V1
    assert codec.decode(data) == {"request_id": "r1", "user_id": 3, "item_id": 7, "query": None, "label": 1,
                                  "event_time": 1000}


@pytest.mark.parametrize("cls,rec,name", [
    (ItemEvent, item_rec(op="retire"), "ItemEvent"),
    (InteractionEvent, InteractionEvent("r", 1, 2, 0, 5, query="heat").to_record(), "InteractionEvent"),
    (ItemTokensEvent, ItemTokensEvent(7, [1, 9, 17], [3, 40], "abc", 100, 100, True).to_record(), "ItemTokensEvent"),
    (ItemTokensEvent, ItemTokensEvent(7, [1, 9, 17], [3, 40], "abc", 100, 100, False, [1, 4, 2]).to_record(),
     "ItemTokensEvent"),
    (ItemTokensEvent, ItemTokensEvent(7, [1, 9, 17], [3, 40], "abc", 100, 100, False, [1, 4, 2],
                                      [2**26 - 1, 0, 12345]).to_record(), "ItemTokensEvent"),
])
def test_roundtrip_every_event_type(codec, cls, rec, name):
    assert cls.from_record(codec.decode(codec.encode(rec, name))).to_record() == rec


def test_registry_ids_are_stable_and_producers_write_v1():
    reg = default_registry()
    assert reg.full_name(ITEM_V1) == reg.full_name(ITEM_V2) == "trm.streams.ItemEvent"
    assert reg.full_name(TOKENS_V1) == reg.full_name(TOKENS_V2) == reg.full_name(TOKENS_V3) == \
        "trm.streams.ItemTokensEvent"
    assert reg.write_id("ItemEvent") == ITEM_V1
    assert reg.write_id("trm.streams.InteractionEvent") == INTERACTION_V1
    # v2 added coarse_tokens, v3 lexical_tokens (every reader here has them)
    assert reg.write_id("ItemTokensEvent") == TOKENS_V3


def test_item_tokens_v1_and_v2_read_each_other(codec):
    """A v1 record (written before coarse tokens) reads with coarse_tokens = []; a v2 one for a v1 reader
    drops them: the topic can hold both while workers and servers roll."""
    rec = ItemTokensEvent(7, [1, 9, 17], [3, 40], "abc", 100, 100, False, [1, 4, 2]).to_record()
    rec.pop("lexical_tokens")  # not in v2
    old = {k: v for k, v in rec.items() if k != "coarse_tokens"}
    assert ItemTokensEvent.from_record(codec.decode(codec.encode(old, schema_id=TOKENS_V1))).coarse_tokens == []
    assert codec.decode(codec.encode(rec, schema_id=TOKENS_V2), reader_schema_id=TOKENS_V1) == old


def test_item_tokens_v3_adds_lexical_tokens_and_reads_older_versions(codec):
    """v3 (category tokens) round-trips; a v2 or v1 record reads with lexical_tokens = [] (as Avro's
    default for a v3 reader, and as ItemTokensEvent.from_record of the writer's own record); a v3 one
    for a v2 reader drops them."""
    ev = ItemTokensEvent(7, [1, 9, 17], [3, 40], "abc", 100, 100, False, [1, 4, 2], [5, 2**26 - 1])
    rec = ev.to_record()
    data = codec.encode(rec, "ItemTokensEvent")
    assert struct.unpack(">I", data[1:5])[0] == TOKENS_V3
    assert ItemTokensEvent.from_record(codec.decode(data)) == ev
    v2 = {k: v for k, v in rec.items() if k != "lexical_tokens"}
    v1 = {k: v for k, v in v2.items() if k != "coarse_tokens"}
    for old, sid in ((v2, TOKENS_V2), (v1, TOKENS_V1)):
        raw = codec.encode(old, schema_id=sid)
        assert ItemTokensEvent.from_record(codec.decode(raw)).lexical_tokens == []
        resolved = codec.decode(raw, reader_schema_id=TOKENS_V3)
        assert resolved["lexical_tokens"] == [] and ItemTokensEvent.from_record(resolved).lexical_tokens == []
    assert ItemTokensEvent.from_record(codec.decode(codec.encode(v2, schema_id=TOKENS_V2))).coarse_tokens == [1, 4, 2]
    assert codec.decode(data, reader_schema_id=TOKENS_V2) == v2


def test_v2_writer_still_decodes_for_a_v1_reader(codec):
    """Evolution: a producer moved to v2 (new optional field); an old consumer resolves to v1."""
    data = codec.encode(item_rec(language="en"), schema_id=ITEM_V2)
    old = codec.decode(data, reader_schema_id=ITEM_V1)
    assert "language" not in old and old == item_rec()
    assert codec.decode(data)["language"] == "en"  # a v2-aware consumer sees it


def test_v1_writer_decodes_for_a_v2_reader_with_the_default(codec):
    data = codec.encode(item_rec(), schema_id=ITEM_V1)
    assert codec.decode(data, reader_schema_id=ITEM_V2) == {**item_rec(), "language": None}


def test_registry_rejects_reusing_an_id_for_another_schema():
    reg = SchemaRegistry.from_dir()
    with pytest.raises(ValueError, match="immutable"):
        reg.register(ITEM_V1, reg.raw[INTERACTION_V1])


@pytest.mark.parametrize("data,match", [
    (b"", "shorter than the 5-byte"),
    (b"\x01\x00\x00\x00\x02abc", "magic byte 1"),
    (b"\x00\x00\x00\x03\xe7\x02", "unknown schema id 999"),
    (b"\x00\x00\x00\x00\x02\xff\xff\xff", "does not decode"),
])
def test_bad_bytes_raise_decode_error_with_reason(codec, data, match):
    with pytest.raises(DecodeError, match=match):
        codec.decode(data)


def test_trailing_bytes_and_wrong_record_type_are_rejected(codec):
    good = codec.encode(InteractionEvent("r", 1, 2, 0, 5).to_record(), "InteractionEvent")
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(good + b"\x00")
    item = codec.encode(item_rec(), "ItemEvent")
    with pytest.raises(DecodeError, match="expected InteractionEvent"):
        codec.decode(item, expect="InteractionEvent")


@pytest.mark.parametrize("rec,match", [
    ({"request_id": "r", "user_id": 1, "item_id": 2, "label": 3, "event_time": 5}, "label=3"),
    ({"request_id": "r", "user_id": 0, "item_id": 2, "label": 1, "event_time": 5}, "ids must be positive"),
    ({"request_id": "r", "user_id": 1, "item_id": 2, "label": 1, "event_time": 1_700_000_000_000}, "epoch seconds"),
])
def test_invalid_interactions_are_rejected_with_a_reason(rec, match):
    with pytest.raises(InvalidEvent, match=match):
        InteractionEvent.from_record(rec)


def test_upsert_without_text_is_invalid_but_retire_without_text_is_not():
    with pytest.raises(InvalidEvent, match="empty text"):
        ItemEvent.from_record(item_rec(text=" "))
    assert ItemEvent.from_record(item_rec(text="", op="retire")).op == "retire"
