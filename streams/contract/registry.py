"""A local schema registry: schema id -> parsed Avro schema, read from `streams/contract/schemas/`.

The ids in `registry.json` are what the Confluent framing carries on the wire, so they are
stable by construction (a file, reviewed like code) rather than assigned by a server. A
Confluent Schema Registry is a drop-in: it maps the same ids to the same schemas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import fastavro

from streams.errors import StreamsError

SCHEMA_DIR = Path(__file__).parent / "schemas"


class SchemaNotFound(StreamsError, KeyError):
    """A schema id or record name the registry does not know."""


@dataclass
class SchemaRegistry:
    schemas: dict[int, dict] = field(default_factory=dict)  # id -> parsed schema
    raw: dict[int, dict] = field(default_factory=dict)  # id -> schema JSON as written
    write_ids: dict[str, int] = field(default_factory=dict)  # full record name -> id producers write

    @classmethod
    def from_dir(cls, directory: str | Path = SCHEMA_DIR) -> "SchemaRegistry":
        d = Path(directory)
        index_path = d / "registry.json"
        if not index_path.exists():
            raise SchemaNotFound(f"{index_path} is missing: it maps schema ids to .avsc files")
        index = json.loads(index_path.read_text())
        reg = cls()
        for sid, fname in index["schemas"].items():
            raw = json.loads((d / fname).read_text())
            reg.register(int(sid), raw)
        reg.write_ids = {name: int(sid) for name, sid in index.get("write", {}).items()}
        for name, sid in reg.write_ids.items():
            if sid not in reg.schemas:
                raise SchemaNotFound(f"registry.json: write id {sid} for {name} is not a registered schema")
        return reg

    def register(self, schema_id: int, raw: dict) -> None:
        if schema_id in self.raw and self.raw[schema_id] != raw:
            raise ValueError(f"schema id {schema_id} is already registered with a different schema; ids are immutable")
        self.raw[schema_id] = raw
        self.schemas[schema_id] = fastavro.parse_schema(raw, named_schemas={})

    def get(self, schema_id: int) -> dict:
        try:
            return self.schemas[schema_id]
        except KeyError:
            raise SchemaNotFound(
                f"unknown schema id {schema_id}: add it to {SCHEMA_DIR}/registry.json "
                f"(known: {sorted(self.schemas)})") from None

    def full_name(self, schema_id: int) -> str:
        raw = self.raw[schema_id]
        ns = raw.get("namespace")
        return f"{ns}.{raw['name']}" if ns else raw["name"]

    def write_id(self, record_name: str) -> int:
        """The schema id producers use for a record (`ItemEvent` or `trm.streams.ItemEvent`)."""
        for name, sid in self.write_ids.items():
            if name == record_name or name.rsplit(".", 1)[-1] == record_name:
                return sid
        raise SchemaNotFound(f"no write schema for {record_name!r}; known: {sorted(self.write_ids)}")


@lru_cache(maxsize=1)
def default_registry() -> SchemaRegistry:
    return SchemaRegistry.from_dir(SCHEMA_DIR)
