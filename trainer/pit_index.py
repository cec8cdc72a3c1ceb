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
`pandas.merge_asof` over the delta (bounded by the horizon, not the store) and a dict lookup into
the snapshot. Events older than W (a warm start over history, a trainer far behind) go to Feast
itself, so every answer is Feast's; tests/test_pit_index.py checks identity against Feast.

Ordering of one call (numbered, in one place):
1. list each view's part files; read the ones not seen yet (a file that vanished between the
   listing and the read was a compaction input: list again, its rows are in the merged file,
   which is renamed into place before any input is deleted);
2. new rows stamped before W fold into the snapshot, the rest join the delta (on the first call W
   is set from this batch before any file is read, so the first build folds file by file);
3. W advances to (oldest event of this batch - `horizon_s`), folding delta rows older than it
   into the snapshot once they are `fold_rows` or more (amortised: a fold costs O(rows folded));
4. events with t ≥ W are answered from the index, the others by Feast; input order restored.

Memory is O(entities + rows within the horizon), not O(store). Duplicates (a compacted file
repeats rows already read) resolve to the same answer and leave the delta as it is folded.
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

from .pit_join import FEATURE_SERVICE, PIT_OFFSET, ROW, FeastJoiner, JoinError, entity_frame

TS, CREATED, POS = "_ts", "_created", "_pos"  # internal column names (ns since epoch, row position)
NEG_INF = np.iinfo(np.int64).min


@dataclass
class IndexConfig:
    # W trails the oldest event of the latest batch by this much: a later batch reaching further
    # back than that (a stream out of order by more than an hour) is answered by Feast instead
    horizon_s: float = 3600.0
    fold_rows: int = 8192  # fold delta rows older than W once there are this many


def _arrow_ns(table, name: str) -> np.ndarray:
    """A timestamp column of a part file as int64 ns (null -> older than anything), no pandas
    datetime round trip (which iterates per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        return np.full(len(table), NEG_INF, np.int64)
    col = table.column(name)
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("ns", tz=col.type.tz))
    return pc.fill_null(col.cast(pa.int64()), NEG_INF).to_numpy()


@dataclass
class _Snapshot:
    """Per entity the winning row stamped before W: columnar arrays with a key -> position dict."""
    features: list[str]
    pos: dict = field(default_factory=dict)
    n: int = 0
    ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    created: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    cols: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cols = {f: np.empty(0, object) for f in self.features}  # an empty snapshot answers "nothing"

    def _grow(self, need: int) -> None:
        cap = len(self.ts)
        if need <= cap:
            return
        cap = max(need, 2 * cap, 1024)
        self.ts = np.resize(self.ts, cap)
        self.created = np.resize(self.created, cap)
        for f in self.features:
            old = self.cols[f]
            new = np.empty(cap, object)
            new[:len(old)] = old[:len(old)]
            self.cols[f] = new

    def fold(self, rows: pd.DataFrame, key: str) -> None:
        """Merge rows (key, _ts, _created, features) in: per key the latest (ts, created) wins."""
        if rows.empty:
            return
        rows = rows.sort_values([key, TS, CREATED], kind="stable").drop_duplicates(key, keep="last")
        keys = rows[key].to_numpy()
        ts, cr = rows[TS].to_numpy(), rows[CREATED].to_numpy()
        at = np.fromiter((self.pos.get(k, -1) for k in keys.tolist()), np.int64, len(keys))
        old = at >= 0
        newer = np.zeros(len(keys), bool)
        newer[old] = (ts[old] > self.ts[at[old]]) | ((ts[old] == self.ts[at[old]]) & (cr[old] >= self.created[at[old]]))
        fresh = ~old
        n_new = int(fresh.sum())
        self._grow(self.n + n_new)
        at[fresh] = np.arange(self.n, self.n + n_new)
        for k, p in zip(keys[fresh].tolist(), at[fresh].tolist()):
            self.pos[k] = p
        self.n += n_new
        put = newer | fresh
        dst = at[put]
        self.ts[dst], self.created[dst] = ts[put], cr[put]
        for f in self.features:
            self.cols[f][dst] = rows[f].to_numpy(object)[put]


@dataclass
class _ViewIndex:
    """Snapshot + delta of one feature view (see the module docstring)."""
    name: str
    key: str
    features: list[str]
    directory: Path
    seen: set = field(default_factory=set)
    w: int = NEG_INF  # the boundary (ns): snapshot rows < w <= delta rows
    snapshot: _Snapshot | None = None
    delta: pd.DataFrame | None = None
    pending: list = field(default_factory=list)  # delta frames not yet merged into `delta`

    def __post_init__(self) -> None:
        self.snapshot = _Snapshot(self.features)
        self.delta = self._empty()

    def _empty(self) -> pd.DataFrame:
        return pd.DataFrame({self.key: pd.Series([], dtype="int64"), TS: pd.Series([], dtype="int64"),
                             CREATED: pd.Series([], dtype="int64"),
                             **{f: pd.Series([], dtype=object) for f in self.features}})

    # 1. read the files not seen yet ------------------------------------------------------------
    def refresh(self) -> int:
        """Read new part files; returns rows read."""
        import pyarrow.parquet as pq

        rows = 0
        for _ in range(100):  # relist while files vanish under us (compaction deleting its inputs)
            names = sorted(e.name for e in os.scandir(self.directory)
                           if e.name.endswith(".parquet") and not e.name.startswith(".") and e.is_file())
            vanished = False
            for name in names:
                if name in self.seen:
                    continue
                try:
                    table = pq.read_table(self.directory / name)
                except FileNotFoundError:
                    vanished = True
                    continue
                self.seen.add(name)
                rows += len(table)
                if len(table):
                    self._ingest(table)
            self.seen &= set(names)  # deleted inputs: their names never come back
            if not vanished:
                return rows
        raise JoinError(f"{self.directory}: part files keep vanishing while listed; is a compaction looping?")

    # 2. new rows: older than W -> snapshot, else delta -------------------------------------------
    def _ingest(self, table) -> None:
        """A pyarrow table of part-file rows -> snapshot (stamped before W) or delta."""
        frame = pd.DataFrame({self.key: table.column(self.key).to_numpy().astype("int64"),
                              TS: _arrow_ns(table, "event_timestamp"), CREATED: _arrow_ns(table, "created")})
        names = set(table.column_names)
        for f in self.features:
            frame[f] = table.column(f).to_pandas().to_numpy(object) if f in names else None
        old = frame[TS].to_numpy() < self.w
        if old.any():
            self.snapshot.fold(frame[old], self.key)
        if (~old).any():
            self.pending.append(frame[~old])

    def _delta(self) -> pd.DataFrame:
        if self.pending:
            self.delta = pd.concat([self.delta, *self.pending], ignore_index=True)
            self.delta = self.delta.sort_values([TS, CREATED], kind="stable", ignore_index=True)
            self.pending = []
        return self.delta

    # 3. advance W -------------------------------------------------------------------------------
    def advance(self, w: int, fold_rows: int) -> None:
        if w <= self.w:
            return
        d = self._delta()
        cut = int(np.searchsorted(d[TS].to_numpy(), w, side="left"))  # rows [0, cut) are older than w
        if cut >= fold_rows or self.w == NEG_INF:
            self.snapshot.fold(d.iloc[:cut], self.key)
            self.delta = d.iloc[cut:].reset_index(drop=True)
            self.w = w

    # 4. answer ----------------------------------------------------------------------------------
    def lookup(self, keys: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Per (key, t >= W) the features of the latest row stamped <= t: {feature: object array}."""
        n = len(keys)
        out = {f: np.full(n, None, object) for f in self.features}
        d = self._delta()
        # rows stamped after the batch's newest time cannot answer it (a store ahead of the trainer)
        d = d.iloc[:int(np.searchsorted(d[TS].to_numpy(), t.max(), side="right"))] if n else d
        left = pd.DataFrame({self.key: keys.astype("int64"), TS: t.astype("int64"), POS: np.arange(n)})
        left = left.sort_values(TS, kind="stable")
        right = pd.DataFrame({self.key: d[self.key].to_numpy(), TS: d[TS].to_numpy(), "_j": np.arange(len(d))})
        m = pd.merge_asof(left, right, on=TS, by=self.key, direction="backward", allow_exact_matches=True)
        j = m["_j"].to_numpy()
        rows_at = m[POS].to_numpy()
        hit = ~np.isnan(j)
        for f in self.features:
            out[f][rows_at[hit]] = d[f].to_numpy(object)[j[hit].astype(np.int64)]
        miss = rows_at[~hit]
        if len(miss):
            snap = self.snapshot
            at = np.fromiter((snap.pos.get(k, -1) for k in keys[miss].tolist()), np.int64, len(miss))
            ok = at >= 0
            for f in self.features:
                out[f][miss[ok]] = snap.cols[f][at[ok]]
        return out

    @property
    def rows_held(self) -> int:
        return self.snapshot.n + len(self.delta) + sum(len(p) for p in self.pending)


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
        self.views = [_ViewIndex(v, k, list(f), d) for v, k, f, d in views]
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
