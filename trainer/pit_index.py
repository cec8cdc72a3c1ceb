"""A point-in-time join that costs O(batch), not O(store): a trainer-side index over the part files.

Feast's `get_historical_features` over the DuckDB offline store scans every row of every view on
every call (../shared/scale/PIT-JOIN.md: ~1.35 s per million rows for one 2,048-event batch), so a
trainer that joins each micro-batch falls behind once the store holds a few million rows. But a
continuous trainer asks about *recent* times only, and the offline store only ever gains files
(the sink appends one part file per batch; compaction writes a merged file before it deletes the
inputs). So the trainer can read each file once and keep, per view:

* a **snapshot**: per entity, the winning row among rows stamped before a boundary W (the row
  with the latest `event_timestamp`, then the latest `created`: Feast's own rule);
* a **delta**: every row stamped at or after W, sorted by (event_timestamp, created).

For an event whose PIT timestamp t ≥ W, Feast's answer is the latest row of its entity with
stamp ≤ t: the latest such row in the delta if there is one (every delta row is newer than any
snapshot row), else the snapshot row. Both are found without touching the rest of the store:
`pandas.merge_asof` over the delta (bounded by the horizon, not the store) and a binary search
into the snapshot's sorted keys. Events older than W (a warm start over history, a trainer far
behind) go to Feast itself, so every answer is Feast's; tests/test_pit_index.py checks identity
against Feast.

Ordering of one call (numbered, in one place):
1. list each view's part files; read the ones not seen yet (a file that vanished between the
   listing and the read was a compaction input: list again, its rows are in the merged file,
   which is renamed into place before any input is deleted);
2. new rows stamped before W fold into the snapshot, the rest join the delta (on the first call W
   is set from this batch before any file is read, so the first build folds file by file);
3. W advances to (oldest event of this batch - `horizon_s`), folding delta rows older than it
   into the snapshot once they are `fold_rows` or more (amortised: a fold costs O(rows folded));
4. events with t ≥ W are answered from the index, the others by Feast; input order restored.

Memory is O(entities + rows within the horizon), not O(store), and stays columnar: snapshot and
delta are Arrow tables (list columns as flat values + offsets), files are read in pieces of
`read_batch` rows, and "latest per key" is one numpy lexsort per fold. Python objects exist only
for the rows of one batch's answer. (At L, 19 M rows over 1.1 M entities, the earlier form, whole
files read at once and one Python object per row and column, passed 9 GB within 25 s of its first
build and was once OOM-killed at 23 GB; this one peaks at 2.4 GB RSS, 0.7 GB of it the process
before the build.) Duplicates (a compacted file repeats rows already read) resolve to the same
answer and leave the delta as it is folded.
Ties on both (event_timestamp, created) — which the sink never writes for one entity — are the
one case where Feast's pick is unspecified; the index takes the row read last.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .pit_join import FEATURE_SERVICE, PIT_OFFSET, ROW, FeastJoiner, JoinError, entity_frame

TS, CREATED, POS = "_ts", "_created", "_pos"  # internal column names (ns since epoch, row position)
NEG_INF = np.iinfo(np.int64).min


@dataclass
class IndexConfig:
    # W trails the oldest event of the latest batch by this much: a later batch reaching further
    # back than that (a stream out of order by more than an hour) is answered by Feast instead
    horizon_s: float = 3600.0
    fold_rows: int = 8192  # fold delta rows older than W once there are this many


def _arrow_ns(table: pa.Table, name: str) -> np.ndarray:
    """A timestamp column of a part file as int64 ns (null -> older than anything), no pandas
    datetime round trip (which iterates per row)."""
    if name not in table.column_names:
        return np.full(len(table), NEG_INF, np.int64)
    col = table.column(name)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("ns", tz=col.type.tz))
    return pc.fill_null(col.cast(pa.int64()), NEG_INF).to_numpy()


def _rows(batch: pa.Table, key: str, schema: pa.Schema) -> pa.Table:
    """Part-file rows -> (key, _ts, _created, features) conformed to `schema` (the features' Arrow
    types): a feature a file lacks is null, so every chunk of the index concatenates."""
    n = len(batch)
    cols = {key: pc.cast(batch.column(key), pa.int64()), TS: pa.array(_arrow_ns(batch, "event_timestamp")),
            CREATED: pa.array(_arrow_ns(batch, "created"))}
    for f in schema:
        if f.name in batch.column_names:
            col = batch.column(f.name)
            cols[f.name] = col if col.type == f.type else col.cast(f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols)


def _latest_per_key(keys: np.ndarray, ts: np.ndarray, created: np.ndarray) -> np.ndarray:
    """Positions of the winning row per key (latest (ts, created); on a full tie the later
    position, i.e. the row read last), in ascending key order. One stable lexsort, no Python loop."""
    order = np.lexsort((created, ts, keys))  # stable: equal (key, ts, created) keep read order
    k = keys[order]
    last = np.ones(len(k), bool)
    last[:-1] = k[1:] != k[:-1]
    return order[last]


def _objects(col) -> np.ndarray:
    """An Arrow column -> the object array the join hands to `_typed` (lists as numpy arrays, as
    pandas converts them): only ever called on the rows of one batch's answers."""
    return col.to_pandas().to_numpy(object)


@dataclass
class _Snapshot:
    """Per entity the winning row stamped before W, held columnar (Arrow), never as Python objects.

    Why this shape: at L (1 M items, 100 k users, each row's lists holding ~100 ints in all) the
    earlier snapshot, one numpy array per row and list column, was most of a first build that
    never finished under 9 GB; as Arrow the three views' snapshots add ~0.6 GB there. Layout:

    * `keys` (sorted int64), with `ts`, `created` (the winner's stamps) and `where` (its row in
      the store) aligned to it: a lookup is one `np.searchsorted`; new entities are inserted with
      `np.insert` (one vectorised copy of these four int64 arrays);
    * the store: Arrow tables of feature rows (`chunks`), appended to by each fold, so a fold
      copies O(rows folded) feature rows, not O(entities). Superseded rows stay until they outnumber the live
      ones, then the live rows are copied out once (amortised O(1) per folded row); consecutive
      chunks merge while the older one is not much bigger (a binary counter: O(log) chunks).

    Rows come in through `add` and wait in a buffer until `fold_batch` of them (many small part
    files fold as one); `flush` folds the rest before any lookup.
    """
    schema: pa.Schema  # the features' columns
    fold_batch: int = 1 << 16
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    created: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    where: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    chunks: list = field(default_factory=list)  # pa.Table of feature rows, in store order
    starts: list = field(default_factory=list)  # first store row of each chunk
    stored: int = 0  # rows in the store, live or superseded
    buffer: list = field(default_factory=list)  # (key, _ts, _created, features) tables not yet folded
    buffered: int = 0

    @property
    def n(self) -> int:
        return len(self.keys)

    def add(self, rows: pa.Table) -> None:
        """Rows (key, _ts, _created, features) stamped before W; folded once enough wait."""
        if len(rows):
            self.buffer.append(rows)
            self.buffered += len(rows)
        if self.buffered >= self.fold_batch:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            rows = pa.concat_tables(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
            self.buffer, self.buffered = [], 0
            self._fold(rows)

    def _fold(self, rows: pa.Table) -> None:
        """Merge rows in: per key the latest (ts, created) wins, ties to the row read last."""
        key = rows.column_names[0]
        k, ts, cr = (rows.column(c).to_numpy() for c in (key, TS, CREATED))
        win = _latest_per_key(k, ts, cr)
        k, ts, cr = k[win], ts[win], cr[win]
        pos = np.searchsorted(self.keys, k)
        found = pos < self.n
        found[found] = self.keys[pos[found]] == k[found]
        at = pos[found]
        newer = np.ones(len(k), bool)
        newer[found] = (ts[found] > self.ts[at]) | ((ts[found] == self.ts[at]) & (cr[found] >= self.created[at]))
        win, k, ts, cr, pos, found = win[newer], k[newer], ts[newer], cr[newer], pos[newer], found[newer]
        if not len(win):
            return
        rows_at = self.stored + np.arange(len(win))
        self._append(rows.select(self.schema.names).take(pa.array(win)))
        at = pos[found]
        self.ts[at], self.created[at], self.where[at] = ts[found], cr[found], rows_at[found]
        fresh = ~found  # new entities: inserted in key order (k is sorted, so are their positions)
        if fresh.any():
            p = pos[fresh]
            self.keys, self.ts = np.insert(self.keys, p, k[fresh]), np.insert(self.ts, p, ts[fresh])
            self.created, self.where = np.insert(self.created, p, cr[fresh]), np.insert(self.where, p, rows_at[fresh])
        if self.stored > 2 * self.n:  # superseded rows outnumber the live ones: keep the live ones only
            live = self.take(self.where)
            self.chunks, self.starts, self.stored = [live], [0], len(live)
            self.where = np.arange(self.n, dtype=np.int64)

    def _append(self, table: pa.Table) -> None:
        self.chunks.append(table)
        self.starts.append(self.stored)
        self.stored += len(table)
        while len(self.chunks) > 1 and len(self.chunks[-2]) <= 2 * len(self.chunks[-1]):
            last = self.chunks.pop()  # store row numbers stay valid: the two are consecutive
            self.starts.pop()
            self.chunks[-1] = pa.concat_tables([self.chunks[-1], last]).combine_chunks()

    def take(self, rows_at: np.ndarray) -> pa.Table:
        """Feature rows at store positions `rows_at`, in that order."""
        if len(self.chunks) == 1:
            return self.chunks[0].take(pa.array(rows_at))
        chunk = np.searchsorted(np.asarray(self.starts), rows_at, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        c_sorted = chunk[order]
        pieces = []
        for c in np.unique(c_sorted).tolist():
            lo, hi = np.searchsorted(c_sorted, [c, c + 1])
            pieces.append(self.chunks[c].take(pa.array(rows_at[order[lo:hi]] - self.starts[c])))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return pa.concat_tables(pieces).take(pa.array(back))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, pa.Table]:
        """(positions in `keys` that have a snapshot row, those rows' features)."""
        self.flush()
        pos = np.searchsorted(self.keys, keys)
        ok = pos < self.n
        ok[ok] = self.keys[pos[ok]] == keys[ok]
        hit = np.flatnonzero(ok)
        return hit, self.take(self.where[pos[hit]]) if len(hit) else self.schema.empty_table()

    @property
    def rows_held(self) -> int:
        return self.stored + self.buffered


@dataclass
class _ViewIndex:
    """Snapshot + delta of one feature view (see the module docstring); both Arrow, O(batch) to
    Python objects only when answering."""
    name: str
    key: str
    schema: pa.Schema  # the features' Arrow columns (the part-file schema, less key and stamps)
    directory: Path
    seen: set = field(default_factory=set)
    w: int = NEG_INF  # the boundary (ns): snapshot rows < w <= delta rows
    snapshot: _Snapshot | None = None
    delta: pa.Table | None = None  # (key, _ts, _created, features) sorted by (_ts, _created)
    pending: list = field(default_factory=list)  # delta rows not yet merged into `delta`
    read_batch: int = 1 << 16  # rows per read of a part file: a compacted file is read in pieces

    def __post_init__(self) -> None:
        self.snapshot = _Snapshot(self.schema)
        self.delta = _rows(pa.table({self.key: pa.array([], pa.int64())}), self.key, self.schema)

    @property
    def features(self) -> list[str]:
        return self.schema.names

    # 1. read the files not seen yet ------------------------------------------------------------
    def refresh(self) -> int:
        """Read new part files; returns rows read."""
        rows = 0
        for _ in range(100):  # relist while files vanish under us (compaction deleting its inputs)
            names = sorted(e.name for e in os.scandir(self.directory)
                           if e.name.endswith(".parquet") and not e.name.startswith(".") and e.is_file())
            vanished = False
            for name in names:
                if name in self.seen:
                    continue
                try:
                    part = pq.ParquetFile(self.directory / name)  # open: readable to the end even if deleted now
                except FileNotFoundError:
                    vanished = True
                    continue
                self.seen.add(name)
                rows += self._read(part)
            self.seen &= set(names)  # deleted inputs: their names never come back
            if not vanished:
                return rows
        raise JoinError(f"{self.directory}: part files keep vanishing while listed; is a compaction looping?")

    def _read(self, part: pq.ParquetFile) -> int:
        """Ingest one part file in pieces of `read_batch` rows, only the columns the index keeps:
        a compacted file of 9 M rows would be ~8 GB of Arrow at once."""
        have = set(part.schema_arrow.names)
        cols = [c for c in (self.key, *self.features, "event_timestamp", "created") if c in have]
        n = 0
        for batch in part.iter_batches(batch_size=self.read_batch, columns=cols):
            n += batch.num_rows
            if batch.num_rows:
                self._ingest(_rows(pa.Table.from_batches([batch]), self.key, self.schema))
        return n

    # 2. new rows: older than W -> snapshot, else delta -------------------------------------------
    def _ingest(self, rows: pa.Table) -> None:
        """Rows (key, _ts, _created, features) -> snapshot (stamped before W) or delta."""
        old = rows.column(TS).to_numpy() < self.w
        if old.all():
            self.snapshot.add(rows)
        elif not old.any():
            self.pending.append(rows)
        else:
            self.snapshot.add(rows.filter(pa.array(old)))
            self.pending.append(rows.filter(pa.array(~old)))

    def _delta(self) -> pa.Table:
        if self.pending:
            d = pa.concat_tables([self.delta, *self.pending])
            order = np.lexsort((d.column(CREATED).to_numpy(), d.column(TS).to_numpy()))  # stable: read order on ties
            self.delta = d.take(pa.array(order))
            self.pending = []
        return self.delta

    # 3. advance W -------------------------------------------------------------------------------
    def advance(self, w: int, fold_rows: int) -> None:
        if w <= self.w:
            return
        d = self._delta()
        cut = int(np.searchsorted(d.column(TS).to_numpy(), w, side="left"))  # rows [0, cut) are older than w
        if cut >= fold_rows or self.w == NEG_INF:
            self.snapshot.add(d.slice(0, cut))
            self.delta = d.take(pa.array(np.arange(cut, len(d))))  # a copy: the folded rows' buffers go
            self.w = w

    # 4. answer ----------------------------------------------------------------------------------
    def lookup(self, keys: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Per (key, t >= W) the features of the latest row stamped <= t: {feature: object array}."""
        n = len(keys)
        out = {f: np.full(n, None, object) for f in self.features}
        d = self._delta()
        d_ts = d.column(TS).to_numpy()
        # rows stamped after the batch's newest time cannot answer it (a store ahead of the trainer)
        end = int(np.searchsorted(d_ts, t.max(), side="right")) if n else len(d)
        left = pd.DataFrame({self.key: keys.astype("int64"), TS: t.astype("int64"), POS: np.arange(n)})
        left = left.sort_values(TS, kind="stable")
        right = pd.DataFrame({self.key: d.column(self.key).to_numpy()[:end], TS: d_ts[:end], "_j": np.arange(end)})
        m = pd.merge_asof(left, right, on=TS, by=self.key, direction="backward", allow_exact_matches=True)
        j = m["_j"].to_numpy()
        rows_at = m[POS].to_numpy()
        hit = ~np.isnan(j)
        if hit.any():
            got = d.take(pa.array(j[hit].astype(np.int64)))
            for f in self.features:
                out[f][rows_at[hit]] = _objects(got.column(f))
        miss = rows_at[~hit]
        if len(miss):
            found, got = self.snapshot.lookup(keys[miss].astype("int64"))
            for f in self.features:
                if len(found):
                    out[f][miss[found]] = _objects(got.column(f))
        return out

    @property
    def rows_held(self) -> int:
        return self.snapshot.rows_held + len(self.delta) + sum(len(p) for p in self.pending)


def _feature_columns(store, service: str) -> list[tuple[str, str, dict, Path]]:
    """(view, join key, {feature: Feast type}, part-file directory) for each view of the service."""
    fs = store.get_feature_service(service)
    out = []
    for proj in fs.feature_view_projections:
        fv = store.get_feature_view(proj.name)
        (ent,) = fv.entities
        key = store.get_entity(ent).join_key
        path = Path(fv.batch_source.path)
        if path.name != "*.parquet":
            raise JoinError(f"view {proj.name}: source {path} is not a part-file directory glob (<dir>/*.parquet)")
        out.append((proj.name, key, {f.name: f.dtype for f in proj.features}, path.parent))
    return out


class IndexedJoiner:
    """The trainer's join step with the part-file index (module docstring); Feast for older times.

    `__call__(events)` has the contract of `pit_join.historical_features`: one row per event, in
    input order, the service's features plus the entity columns. `bulk(events)` is Feast's own
    join, for history (a warm start's window), where a scan per 20,000-event slice is the right cost.
    """

    def __init__(self, repo_path: str, features: str = FEATURE_SERVICE, cfg: IndexConfig | None = None):
        self.feast = FeastJoiner(repo_path, features)  # history, and batches older than the boundary
        self.store = self.feast.store
        self.cfg = cfg or IndexConfig()
        views = _feature_columns(self.store, features)
        from streams.feast_sink import arrow_type  # the features' column types on disk

        self.views = [_ViewIndex(v, k, pa.schema([(name, arrow_type(t)) for name, t in f.items()]), d)
                      for v, k, f, d in views]
        self.types = {name: t for _, _, f, _ in views for name, t in f.items()}
        self.stats = {"indexed": 0, "feast": 0, "rows_read": 0}
        self._lock = threading.Lock()  # the trainer may join the next batch in a prefetch thread

    def bulk(self, events: pd.DataFrame) -> pd.DataFrame:
        return self.feast(events)

    def __call__(self, events: pd.DataFrame) -> pd.DataFrame:
        with self._lock:
            return self._join(events)

    def _join(self, events: pd.DataFrame) -> pd.DataFrame:
        entity = entity_frame(events)
        if entity.empty:
            return entity.drop(columns=[ROW])
        t = entity["event_time"].to_numpy(np.int64) * 10**9 - PIT_OFFSET.value  # ns: event time - 1 µs
        w = int(t.min() - self.cfg.horizon_s * 1e9)
        for v in self.views:
            if v.w == NEG_INF and not v.seen:  # first call: fold while reading, so the build holds
                v.w = w  # O(entities + rows after W), not the whole store (L: 19 M rows, OOM at 23 GB)
            self.stats["rows_read"] += v.refresh()  # 1. + 2.
            v.advance(w, self.cfg.fold_rows)  # 3.
        ok = np.ones(len(entity), bool)
        for v in self.views:
            ok &= t >= v.w
        out = entity.drop(columns=[ROW]).copy()
        out["event_timestamp"] = out["event_timestamp"].dt.as_unit("us")  # as Feast returns it
        cols: dict[str, np.ndarray] = {}
        idx = np.flatnonzero(ok)
        for v in self.views:  # 4.
            got = v.lookup(entity[v.key].to_numpy()[idx], t[idx])
            for f, arr in got.items():
                full = np.full(len(entity), None, object)
                full[idx] = arr
                cols[f] = full
        if not ok.all():  # older than the index's boundary: Feast answers those rows
            old = self.feast(events[~ok].reset_index(drop=True))
            rest = np.flatnonzero(~ok)
            for f in cols:
                cols[f][rest] = old[f].to_numpy(object)
        for f, arr in cols.items():
            out[f] = _typed(arr, self.types[f])
        self.stats["indexed"] += int(ok.sum())
        self.stats["feast"] += int((~ok).sum())
        return out

    @property
    def rows_held(self) -> dict[str, int]:
        return {v.name: v.rows_held for v in self.views}


def _typed(arr: np.ndarray, dtype) -> pd.Series:
    """Object array -> the dtype Feast's to_df gives for the Feast type `dtype`: Int64/Float as
    int64 (none missing) or float64 with NaN, Bool as bool (none missing), the rest as objects."""
    s = pd.Series(arr, dtype=object)
    name = str(dtype)
    missing = s.isna().any()
    if name in ("Int32", "Int64", "Float32", "Float64"):
        return s.astype("float64") if missing or not len(s) else pd.to_numeric(s)
    if name == "Bool" and not missing and len(s):
        return s.astype(bool)
    return s


def joiner_for(repo_path: str, kind: str = "index", features: str | Sequence[str] = FEATURE_SERVICE):
    """The trainer's joiner by name: "index" (IndexedJoiner) or "feast" (pit_join.FeastJoiner)."""
    if kind == "feast":
        return FeastJoiner(repo_path, features)
    if kind == "index":
        return IndexedJoiner(repo_path, features)
    raise ValueError(f"unknown join {kind!r}: use 'index' or 'feast'")
