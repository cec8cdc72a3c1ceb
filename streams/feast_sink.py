"""Write feature rows to Feast online (SQLite/Redis via the provider) and offline (parquet parts).

Why not `store.push(..., to=OFFLINE)`: Feast's offline push reads and rewrites the whole parquet
file on every call, so a stream pushing per batch goes quadratic. The offline source of each view
is a glob over a directory (see feature_repo/definitions.py); a batch becomes one new part file,
written to a temp name and renamed so readers never see half a file: O(batch), flat as it grows.

Why not `write_to_online_store(df)`: it round-trips the batch through pandas and type inference;
building the protos directly and calling the provider's `online_write_batch` is the same write
with less per-row overhead (rows land in the same tables `get_online_features` reads).

Idempotent: the online write is an upsert per entity; replaying a batch re-writes the same
values, and an offline re-write adds rows identical in entity, event_timestamp and values, which
the point-in-time join (latest event_timestamp, then latest `created`) resolves to the same value.

The part-file schema of a view is derived from its FeatureView (`offline_schema`): the entity's
join key, the view's features in declaration order (Feast types mapped to Arrow), then
`event_timestamp` and `created` as timestamp[us, UTC]. A FeastSink derives it from the views in
its store's registry; compaction from the repo's own definitions.py (`offline_schemas`);
`OFFLINE_SCHEMAS` from the project's feature_repo/definitions.py, loaded on first use. A Feast type with no Arrow mapping here, or a
view whose source reads other timestamp columns, raises FeatureDefinitionError naming the view.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StreamsError

TS = pa.timestamp("us", tz="UTC")
EVENT_TIMESTAMP, CREATED = "event_timestamp", "created"  # the timestamp columns every part file ends with
# the entity key of each view (the definitions' entities; tests/test_feature_definitions.py checks them)
JOIN_KEYS = {"item_tokens": "item_id", "user_history": "user_id", "item_stats": "item_id"}


class FeatureDefinitionError(StreamsError, ValueError):
    """A feature view the part-file writer cannot derive a schema for."""


def arrow_type(dtype) -> pa.DataType:
    """A Feast type (feast.types) -> the Arrow type of its parquet column."""
    from feast.types import Array, Bool, Int64, String

    if isinstance(dtype, Array):
        return pa.list_(arrow_type(dtype.base_type))
    prim = {Int64: pa.int64(), String: pa.string(), Bool: pa.bool_()}
    if dtype in prim:
        return prim[dtype]
    raise FeatureDefinitionError(f"no parquet column type for Feast type {dtype}")


def offline_schema(view, entity) -> pa.Schema:
    """The part-file schema of FeatureView `view` whose entity is `entity` (a feast Entity)."""
    from feast.types import from_value_type

    src = view.batch_source
    if src is not None:  # the writer fills these two columns: the source must read the same ones
        for want, got in ((EVENT_TIMESTAMP, src.timestamp_field), (CREATED, src.created_timestamp_column)):
            if got != want:
                raise FeatureDefinitionError(
                    f"view {view.name}: its source's timestamp column is {got!r}, the writer's {want!r}")
    cols = [(entity.join_key, arrow_type(from_value_type(entity.value_type)))]
    for f in view.features:
        try:
            cols.append((f.name, arrow_type(f.dtype)))
        except FeatureDefinitionError as exc:
            raise FeatureDefinitionError(f"view {view.name}, feature {f.name}: {exc}") from None
    return pa.schema(cols + [(EVENT_TIMESTAMP, TS), (CREATED, TS)])


def schemas_from_definitions(objects: Iterable) -> dict[str, pa.Schema]:
    """{view name: part-file schema} for every FeatureView among `objects` (a definitions module's
    values), in declaration order."""
    from feast import Entity, FeatureView

    objects = list(objects)
    entities = {o.name: o for o in objects if isinstance(o, Entity)}
    out: dict[str, pa.Schema] = {}
    for v in objects:
        if isinstance(v, FeatureView) and v.name not in out:
            if len(v.entities) != 1 or v.entities[0] not in entities:
                raise FeatureDefinitionError(f"view {v.name}: expected one entity defined beside it, got {v.entities}")
            out[v.name] = offline_schema(v, entities[v.entities[0]])
    return out


def offline_schemas(repo: str | Path | None = None) -> dict[str, pa.Schema]:
    """{view: part-file schema} of the definitions.py in `repo` (every materialized repo has its
    copy), else of the project's feature_repo/definitions.py."""
    if repo is not None and (Path(repo) / "definitions.py").is_file():
        return _schemas_of(str(Path(repo).resolve()))
    return _schemas_of(None)


@lru_cache(maxsize=None)
def _schemas_of(repo: str | None) -> dict[str, pa.Schema]:
    from .feature_repo_tools import load_definitions, project_definitions

    mod = load_definitions(Path(repo)) if repo is not None else project_definitions()
    return schemas_from_definitions(vars(mod).values())


def __getattr__(name: str):
    """`OFFLINE_SCHEMAS`: {view: part-file schema} of the project's definitions, derived when first
    imported, so importing this module never needs feast or the definitions file."""
    if name == "OFFLINE_SCHEMAS":
        return offline_schemas()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def offline_dir(repo_path: str | Path, view: str) -> Path:
    return Path(repo_path) / "data" / "offline" / view


def to_utc(ts: Any) -> datetime:
    """Epoch seconds (int/float) or datetime -> aware UTC datetime."""
    if isinstance(ts, datetime):
        return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _ts_key(ts: Any) -> float:
    return ts.timestamp() if isinstance(ts, datetime) else float(ts)


def _value_proto(v: Any):
    from feast.protos.feast.types.Value_pb2 import BoolList, Int64List, Value

    if v is None:
        return Value()
    if isinstance(v, bool):
        return Value(bool_val=v)
    if isinstance(v, int):
        return Value(int64_val=v)
    if isinstance(v, str):
        return Value(string_val=v)
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], bool):
            return Value(bool_list_val=BoolList(val=list(v)))
        return Value(int64_list_val=Int64List(val=[int(x) for x in v]))
    raise TypeError(f"no Feast value mapping for {type(v).__name__}: {v!r}")


class FeastSink:
    """`sink.write("item_tokens", rows)`: rows are dicts with the join key, the features and
    `event_timestamp` (epoch seconds or datetime); a feature a row lacks is written as null, online
    and offline alike. Online and offline are written before it returns."""

    def __init__(self, repo_path: str | Path, writer_id: str | None = None):
        from feast import FeatureStore

        self.repo_path = Path(repo_path)
        self.store = FeatureStore(repo_path=str(self.repo_path))
        self.provider = self.store._get_provider()
        self.views = {name: self.store.get_feature_view(name) for name in JOIN_KEYS}
        # part-file schemas from the registry's views: no definitions file needed where workers run
        self.schemas = {name: offline_schema(fv, self.store.get_entity(fv.entities[0]))
                        for name, fv in self.views.items()}
        self.writer_id = writer_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        for view in self.views:
            offline_dir(self.repo_path, view).mkdir(parents=True, exist_ok=True)

    def write(self, view: str, rows: list[dict], online: bool = True, offline: bool = True) -> None:
        if not rows:
            return
        if view not in self.schemas:
            raise KeyError(f"unknown feature view {view!r}; known: {sorted(self.schemas)}")
        now = datetime.now(timezone.utc)
        if offline:
            self.write_offline(view, rows, now)
        if online:
            self.write_online(view, rows, now)

    def write_online(self, view: str, rows: list[dict], created: datetime | None = None) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        fv = self.views[view]
        key = JOIN_KEYS[view]
        names = [f.name for f in fv.features]
        created = created or datetime.now(timezone.utc)
        # one row per entity: the one with the latest event time (then the latest in the batch)
        latest: dict[int, dict] = {}
        for r in rows:
            cur = latest.get(r[key])
            if cur is None or _ts_key(r["event_timestamp"]) >= _ts_key(cur["event_timestamp"]):
                latest[r[key]] = r
        data = [(EntityKey(join_keys=[key], entity_values=[Value(int64_val=int(eid))]),
                 {n: _value_proto(r.get(n)) for n in names}, to_utc(r["event_timestamp"]), created)
                for eid, r in latest.items()]
        self.provider.online_write_batch(self.store.config, fv, data, None)

    def write_offline(self, view: str, rows: list[dict], created: datetime | None = None) -> Path:
        schema = self.schemas[view]
        created = created or datetime.now(timezone.utc)
        cols = {f.name: [r.get(f.name) for r in rows] for f in schema if f.name not in (EVENT_TIMESTAMP, CREATED)}
        ts = [r["event_timestamp"] for r in rows]
        if all(isinstance(t, int) for t in ts):  # epoch seconds: vectorised, no datetime per row
            cols["event_timestamp"] = pa.array([t * 1_000_000 for t in ts], pa.int64()).cast(TS)
        else:
            cols["event_timestamp"] = [to_utc(t) for t in ts]
        cols["created"] = pa.array([created] * len(rows), TS)
        table = pa.table(cols, schema=schema)
        self._seq += 1
        d = offline_dir(self.repo_path, view)
        final = d / f"part-{created.strftime('%Y%m%dT%H%M%S%f')}-{self.writer_id}-{self._seq:06d}.parquet"
        tmp = d / f".{final.name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        return final

    def read_online(self, view: str, ids: Iterable[int], features: list[str] | None = None) -> dict[int, dict]:
        """{id: {feature: value}} from the online store via get_online_features (what serving sees)."""
        fv = self.views[view]
        key = JOIN_KEYS[view]
        feats = features or [f.name for f in fv.features]
        ids = list(ids)
        resp = self.store.get_online_features(features=[f"{view}:{f}" for f in feats],
                                              entity_rows=[{key: int(i)} for i in ids]).to_dict()
        return {i: {f: resp[f][n] for f in feats} for n, i in enumerate(ids)}
