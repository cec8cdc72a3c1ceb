"""Typed events on the topics (see docs/contracts.md) and their Avro dict forms.

`from_item` / `from_interaction` take any record with the MovieLens loader's fields
(streams/movielens.py); the contract itself imports no data source.

`from_record` validates what Avro cannot (ids positive, label 0/1, times sane) and raises
`InvalidEvent` with a reason that the workers put on the dead-letter record.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from streams.errors import StreamsError

MAX_EPOCH_S = 4_102_444_800  # 2100-01-01: a time past this is a unit mistake (ms or µs sent as s)


class InvalidEvent(StreamsError, ValueError):
    """A decodable event whose content breaks the contract."""


def _check_time(name: str, value: int) -> None:
    if not 0 <= value < MAX_EPOCH_S:
        raise InvalidEvent(f"{name}={value} is not epoch seconds in [0, {MAX_EPOCH_S})")


@dataclass(frozen=True)
class ItemEvent:
    item_id: int
    title: str
    text: str
    categories: list[str]
    created_at: int
    event_time: int
    op: str = "upsert"  # upsert | retire

    @classmethod
    def from_item(cls, item, op: str = "upsert", event_time: int | None = None) -> "ItemEvent":
        return cls(item.item_id, item.title, item.text(), list(item.genres), item.created_at,
                   item.created_at if event_time is None else event_time, op)

    @classmethod
    def from_record(cls, rec: dict) -> "ItemEvent":
        ev = cls(rec["item_id"], rec["title"], rec["text"], list(rec.get("categories") or []),
                 rec["created_at"], rec["event_time"], rec.get("op", "upsert"))
        if ev.item_id <= 0:
            raise InvalidEvent(f"item_id={ev.item_id} must be positive")
        _check_time("created_at", ev.created_at)
        _check_time("event_time", ev.event_time)
        if ev.op == "upsert" and not ev.text.strip():
            raise InvalidEvent(f"item {ev.item_id}: upsert with empty text cannot be tokenized")
        return ev

    def to_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InteractionEvent:
    request_id: str
    user_id: int
    item_id: int
    label: int
    event_time: int
    query: str | None = None

    @classmethod
    def from_interaction(cls, it, request_id: str | None = None) -> "InteractionEvent":
        rid = request_id or f"{it.user_id}-{it.item_id}-{it.event_time}"
        return cls(rid, it.user_id, it.item_id, it.label, it.event_time)

    @classmethod
    def from_record(cls, rec: dict) -> "InteractionEvent":
        ev = cls(rec["request_id"], rec["user_id"], rec["item_id"], rec["label"], rec["event_time"], rec.get("query"))
        if ev.user_id <= 0 or ev.item_id <= 0:
            raise InvalidEvent(f"user_id={ev.user_id}, item_id={ev.item_id}: ids must be positive")
        if ev.label not in (0, 1):
            raise InvalidEvent(f"label={ev.label} must be 0 or 1")
        _check_time("event_time", ev.event_time)
        return ev

    def to_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ItemTokensEvent:
    item_id: int
    gen_tokens: list[int]
    mem_tokens: list[int]
    tokenizer_version: str
    created_at: int
    event_time: int
    retired: bool = False
    coarse_tokens: list[int] = field(default_factory=list)  # v2: nearest level-1 codes ([] from a v1 record)
    # v3: the words of the item event's categories and title as tokens, then its release year (tokenizer/lexical.py;
    # [] from a v1/v2 record)
    lexical_tokens: list[int] = field(default_factory=list)

    @classmethod
    def from_record(cls, rec: dict) -> "ItemTokensEvent":
        return cls(rec["item_id"], list(rec["gen_tokens"]), list(rec["mem_tokens"]), rec["tokenizer_version"],
                   rec["created_at"], rec["event_time"], bool(rec.get("retired", False)),
                   list(rec.get("coarse_tokens") or []), list(rec.get("lexical_tokens") or []))

    def to_record(self) -> dict:
        return asdict(self)
