"""Avro codec with Confluent framing: magic byte 0x00, 4-byte big-endian schema id, Avro body.

The id tells a consumer which *writer* schema produced the bytes; it decodes with that schema
resolved against its own *reader* schema (Avro schema resolution), so a producer can move to a
new version that adds an optional field while old consumers keep decoding.
"""
from __future__ import annotations

import io
import struct

import fastavro

from streams.errors import StreamsError

from .registry import SchemaRegistry, default_registry

MAGIC = 0
_HEADER = struct.Struct(">bI")


class DecodeError(StreamsError, ValueError):
    """Bytes that are not a valid framed Avro record; the message says why (it becomes the DLQ reason)."""


class AvroCodec:
    def __init__(self, registry: SchemaRegistry | None = None):
        self.registry = registry or default_registry()

    def encode(self, record: dict, record_name: str | None = None, schema_id: int | None = None) -> bytes:
        """Frame and encode `record` with `schema_id` (default: the registry's write id for `record_name`)."""
        if schema_id is None:
            if record_name is None:
                raise ValueError("encode needs a record_name or a schema_id")
            schema_id = self.registry.write_id(record_name)
        schema = self.registry.get(schema_id)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, schema_id))
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def schema_id_of(self, data: bytes) -> int:
        if data is None or len(data) < _HEADER.size:
            raise DecodeError(f"message of {0 if data is None else len(data)} bytes is shorter than the 5-byte Confluent header")
        magic, sid = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DecodeError(f"magic byte {magic} != 0: not Confluent-framed Avro")
        return sid

    def decode(self, data: bytes, reader_schema_id: int | None = None, expect: str | None = None) -> dict:
        """Decode framed bytes; with `reader_schema_id`, resolve the writer schema to that reader schema.

        `expect` (a record name) rejects records of another type, e.g. an item event on the
        interactions topic.
        """
        sid = self.schema_id_of(data)
        try:
            writer = self.registry.get(sid)
        except KeyError as exc:
            raise DecodeError(str(exc)) from None
        if expect is not None:
            name = self.registry.full_name(sid)
            if name != expect and name.rsplit(".", 1)[-1] != expect:
                raise DecodeError(f"schema id {sid} is {name}, expected {expect}")
        reader = self.registry.get(reader_schema_id) if reader_schema_id is not None else None
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            rec = fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:  # fastavro raises EOFError, ValueError, SchemaResolutionError, ...
            raise DecodeError(f"Avro body does not decode with schema id {sid}: {type(exc).__name__}: {exc}") from None
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the Avro record (schema id {sid})")
        return rec
