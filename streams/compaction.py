"""Offline compaction: merge a view's small parquet part files into one (`trm compact`).

Every stream batch appends one part file (`FeastSink.write_offline`), so a long-running stream
leaves thousands of small files behind and every DuckDB glob read (the trainer's point-in-time
joins) pays per file. `compact_view` merges the part files of one view that are older than
`older_than_s` (by mtime; default 60 s, so in-flight writers' fresh files are left alone) into one
new part file together with the earlier merged files no larger than what is being merged
(`_select_inputs`: size-tiered, so the cost follows what is new), in four steps:

1. read the inputs with DuckDB and drop rows that are duplicates in (join key, event_timestamp),
   keeping the one(s) with the latest `created`;
2. write the result to a hidden temp name (`.part-…-compact-….parquet.tmp`, which the `*.parquet`
   glob never matches) and fsync it;
3. `os.replace` it to `part-…-compact-….parquet` (atomic, the same pattern as `write_offline`);
4. wait `delete_grace_s` (default 10 s), THEN delete the merged inputs.

Why the answers do not change: the point-in-time join groups the rows at or before an entity
row's timestamp and keeps the one with the latest `event_timestamp`, then the latest `created`.
Among rows with the same (join key, event_timestamp) a row with an older `created` therefore can
never win against one with a newer `created`, whatever the entity timestamp: dropping it changes
no answer (tests/test_offline_compaction.py proves it with replayed rows carrying a later
`created` and different values). Rows tied on the latest `created` are all kept (rank, not
row_number), so compaction never decides a tie the join had not decided itself. This holds for
the default join (`filter_by_created_timestamp=False`, what the trainer uses); a query that also
cuts on `created` could have picked the older row, which is what `keep_duplicates=True`
(`--keep-duplicates`) is for: merge only, drop nothing.

Readers and crashes:

* A reader that globs between step 3 and step 4 sees the merged rows twice (in the new file and
  in the inputs not yet deleted). Exact copies and older-`created` duplicates resolve to the same
  answer as above, so this is harmless. The grace period in step 4 is for queries already
  running at the rename: DuckDB expands the glob when a query starts and opens the files as it
  scans, so a query that listed an input and opens it only after the delete fails ("No such
  file"). On a local filesystem a file already open stays readable; the grace covers queries
  shorter than it, and a longer one fails like any read racing a delete (the trainer exits and
  resumes from its checkpoint).
* A kill before step 3 leaves only a hidden temp file: the inputs are intact, and the next
  compaction deletes temp files older than `tmp_older_than_s` (default 1 h; a writer killed
  mid-write leaves the same kind of file and it is removed the same way).
* A kill between step 3 and step 4 leaves duplicates only (harmless, as above); the next
  compaction merges them away.
* Each view is locked (`flock` on `<view dir>/.compaction.lock`) while it is compacted, so two
  overlapping runs (a slow CronJob) skip rather than race; the lock dies with its process.

The seed file `part-00000000-seed.parquet` (written by `materialize_repo` so the glob matches
before the first stream write) is never merged or deleted: the glob always matches a file.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tokenizer.manifest import fsync_dir, fsync_file  # the project's one fsync helper (bottom layer)

DEFAULT_OLDER_THAN_S = 60.0
DEFAULT_MIN_FILES = 2
DEFAULT_TMP_OLDER_THAN_S = 3600.0
DEFAULT_DELETE_GRACE_S = 10.0
SEED_NAME = "part-00000000-seed.parquet"
LOCK_NAME = ".compaction.lock"
ROWS_PER_BATCH = 262_144  # rows per DuckDB -> parquet batch (and row group) while writing


@dataclass
class CompactionResult:
    view: str
    files_before: int = 0
    files_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    merged: int = 0  # input part files merged (and deleted)
    output: Path | None = None  # the new part file, None when nothing was merged
    removed_tmp: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was merged


def _parquet_files(d: Path) -> list[Path]:
    """What the offline store's glob reads (`<view dir>/*.parquet`)."""
    return sorted(p for p in d.glob("*.parquet") if p.is_file())


def _is_compacted(p: Path) -> bool:
    return "-compact-" in p.name


def _select_inputs(files: list[Path], rows: dict[Path, int], older_than_s: float, now: float) -> list[Path]:
    """What one compaction merges: the stream's part files older than `older_than_s`, plus the
    earlier compaction outputs holding no more rows than what is merged so far (smallest first;
    `rows` per file from the parquet footers, not bytes: a small file's bytes are mostly its metadata).

    Size-tiered, so a compaction's cost follows what is new: a big merged file is rewritten only
    once as much new data has piled up beside it (a binary counter of merged files: each row is
    rewritten O(log rows) times, and a view holds O(log rows) merged files), instead of every run
    rewriting the whole store."""
    fresh, merged = [], []
    for p in files:
        if p.name == SEED_NAME or not p.name.startswith("part-"):
            continue
        try:
            if _is_compacted(p):
                merged.append((rows[p], p))
            elif now - p.stat().st_mtime >= older_than_s:
                fresh.append((rows[p], p))
        except FileNotFoundError:
            continue
    budget = sum(sz for sz, _ in fresh)
    take = []
    for sz, p in sorted(merged):
        if not fresh or sz > budget:
            break
        take.append(p)
        budget += sz
    return sorted([p for _, p in fresh] + take)


def _num_rows(paths) -> int:
    import pyarrow.parquet as pq

    n = 0
    for p in paths:
        try:
            n += pq.ParquetFile(p).metadata.num_rows
        except FileNotFoundError:  # deleted by someone else meanwhile
            pass
    return n


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _remove_stale_tmp(d: Path, older_than_s: float, now: float) -> list[Path]:
    """Delete `.part-*.tmp` left by a writer or compaction killed before its rename."""
    removed = []
    for p in d.glob(".part-*.tmp"):
        try:
            if now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _merge(inputs: list[Path], out: Path, join_key: str, schema, keep_duplicates: bool) -> int:
    """Merge `inputs` into parquet `out` (dedup unless keep_duplicates); return rows written."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    con = duckdb.connect()
    try:
        try:
            con.execute("SET TimeZone = 'UTC'")
        except duckdb.Error:  # no ICU: timestamps still carry the same instants
            pass
        # where the window/sort spills when the inputs outgrow memory (the default is ./.tmp,
        # often read-only in a container)
        spill = os.path.join(tempfile.gettempdir(), f"trm-compact-duckdb-{os.getpid()}")
        con.execute(f"SET temp_directory = {_sql_str(spill)}")
        files = "[" + ", ".join(_sql_str(str(p)) for p in inputs) + "]"
        key, ts, created = _sql_ident(join_key), _sql_ident("event_timestamp"), _sql_ident("created")
        sql = f"SELECT * FROM read_parquet({files}, union_by_name = true)"
        if not keep_duplicates:
            sql += f" QUALIFY rank() OVER (PARTITION BY {key}, {ts} ORDER BY {created} DESC NULLS LAST) = 1"
        sql += f" ORDER BY {ts}, {key}, {created}"  # time-sorted: tight row-group stats, better compression
        rel = con.sql(sql)
        to_reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader  # duckdb 2 / older
        reader = to_reader(ROWS_PER_BATCH)  # streamed: DuckDB spills the window/sort, not Python
        if schema is None:
            schema = reader.schema
        names = schema.names
        rows = 0
        with pq.ParquetWriter(out, schema, compression="zstd") as w:
            for batch in reader:
                t = pa.Table.from_batches([batch])
                t = pa.table({n: t[n] if n in t.column_names else pa.nulls(len(t), schema.field(n).type)
                              for n in names}).cast(schema)
                w.write_table(t, row_group_size=ROWS_PER_BATCH)
                rows += len(t)
        fsync_file(out)
        return rows
    finally:
        con.close()


def _view_schema(repo, d: Path, view: str):
    """The view's part-file schema, read from its seed file (materialize_repo writes it from the
    repo's definitions) — no feast import, so `trm compact` starts in a second; derived from the
    repo's definitions.py only where no seed file exists."""
    import pyarrow.parquet as pq

    seed = d / SEED_NAME
    if seed.is_file():
        return pq.read_schema(seed).remove_metadata()
    from .feast_sink import offline_schemas

    return offline_schemas(repo).get(view)


def compact_view(repo: str | os.PathLike, view: str, min_files: int = DEFAULT_MIN_FILES,
                 older_than_s: float = DEFAULT_OLDER_THAN_S, keep_duplicates: bool = False,
                 tmp_older_than_s: float = DEFAULT_TMP_OLDER_THAN_S, delete_grace_s: float = DEFAULT_DELETE_GRACE_S,
                 join_key: str | None = None, now: float | None = None) -> CompactionResult:
    """Merge `view`'s part files older than `older_than_s` into one part file (see the module doc).

    Nothing is merged when fewer than `min_files` files qualify. `join_key` defaults to the
    view's entity key (streams.feast_sink.JOIN_KEYS); the output has the view's offline schema.
    """
    from .feast_sink import JOIN_KEYS, offline_dir

    t0 = time.perf_counter()
    res = CompactionResult(view)
    d = offline_dir(repo, view)
    if not d.is_dir():
        res.skipped = f"no offline directory {d}"
        return res
    join_key = join_key or JOIN_KEYS.get(view)
    if join_key is None and not keep_duplicates:
        raise KeyError(f"unknown feature view {view!r} (known: {sorted(JOIN_KEYS)}): pass join_key or keep_duplicates")
    schema = _view_schema(repo, d, view)

    import fcntl

    lock = open(d / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            res.skipped = "another compaction holds this view's lock"
            return res
        now = time.time() if now is None else now
        res.removed_tmp = _remove_stale_tmp(d, tmp_older_than_s, now)
        before = _parquet_files(d)
        rows = {p: _num_rows([p]) for p in before}  # one footer read per file
        res.files_before, res.rows_before = len(before), sum(rows.values())
        inputs = _select_inputs(before, rows, older_than_s, now)
        n_fresh = sum(1 for p in inputs if not _is_compacted(p))
        if n_fresh < max(min_files, 1):
            res.skipped = f"{n_fresh} new part file(s) older than {older_than_s:g} s (< {max(min_files, 1)})"
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            final = d / f"part-{stamp}-compact-{uuid.uuid4().hex[:8]}.parquet"
            tmp = d / f".{final.name}.tmp"
            try:
                _merge(inputs, tmp, join_key, schema, keep_duplicates)
                os.replace(tmp, final)  # readers now see the merged rows (plus, briefly, the inputs)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(d, best_effort=True)  # the rename is durable before any input disappears
            if delete_grace_s > 0:  # let queries that listed the inputs before the rename finish
                time.sleep(delete_grace_s)
            for p in inputs:
                p.unlink(missing_ok=True)
            fsync_dir(d, best_effort=True)
            res.merged, res.output = len(inputs), final
        after = _parquet_files(d)
        res.files_after, res.rows_after = len(after), _num_rows(after)
    finally:
        lock.close()
    res.seconds = time.perf_counter() - t0
    return res


def compact_repo(repo: str | os.PathLike, views=None, min_files: int = DEFAULT_MIN_FILES,
                 older_than_s: float = DEFAULT_OLDER_THAN_S, keep_duplicates: bool = False,
                 tmp_older_than_s: float = DEFAULT_TMP_OLDER_THAN_S, delete_grace_s: float = DEFAULT_DELETE_GRACE_S,
                 progress: bool = False) -> list[CompactionResult]:
    """`compact_view` for every view of the offline store (default: the project's views)."""
    from .feast_sink import JOIN_KEYS

    views = list(views or JOIN_KEYS)
    it = views
    if progress:
        from tqdm import tqdm

        it = tqdm(views, desc="compacting", unit="view", file=sys.stderr)
    out = []
    for v in it:
        if progress:
            it.set_postfix_str(v)
        out.append(compact_view(repo, v, min_files=min_files, older_than_s=older_than_s,
                                keep_duplicates=keep_duplicates, tmp_older_than_s=tmp_older_than_s,
                                delete_grace_s=delete_grace_s))
    return out
