"""`trm tokenizer backfill`: the stores' tokens re-made by the rotation's new artifact, stamped at its time.

The steps, in this order (the whole rotation: streams/rotation.py):
  1. read, from the offline part files, each item's latest `item_tokens` row at or before T and
     each (user, event time)'s latest `user_history` row (latest `created` wins, as in the join);
  2. tokenize every item that has a row at or before T with the new artifact B, from its text
     as of T (the catalogue's latest item event at or before T), and write its row stamped at T
     (created_at, retired and lexical_tokens kept: categories and title words are the item event's,
     not the artifact's) through FeastSink: offline, and online unless the item has a newer row.
     `publish` gets the same rows as ItemTokensEvents (the `item_tokens` topic: the workers'
     token caches learn B's tokens of every item from it);
  3. rewrite user histories: each user's latest row before T is re-stamped at T, and each row at
     or after T is rewritten at its own time, every event's tokens B's (`tokenizer_version` = B);
     online only where the row is the user's newest;
  4. mark the rotation record `backfilled` (once: a later run leaves the first mark and report),
     with how far the item_tokens topic holds the rows `publish` sent (`tokens_through`): a
     worker applies parked events only once its token cache has read that far:
     workers then apply the interactions they parked mid-rotation.

Why at T and nothing earlier: a point-in-time answer for a time before T reads rows before T only,
which the backfill never writes, so it cannot change. From T on the join picks the rows at T
(or later), which hold B's tokens.

Idempotent: an item whose row at T is already B's, and a user row whose rewrite would change
nothing, are skipped. A second run writes no row and the answers stay the same; a run cut short
is finished by the next one.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from .feast_sink import JOIN_KEYS, FeastSink, offline_dir
from .rotation import read_rotation, write_rotation

ITEMS, USERS = "item_tokens", "user_history"


@dataclass
class BackfillConfig:
    repo: Path  # an applied Feast repo (the workers')
    at: int  # the rotation time T, epoch seconds
    batch: int = 512  # items per encode call and per part file
    progress: bool = True  # tqdm bars


@dataclass
class BackfillReport:
    version: str
    at: int
    items_written: int = 0
    items_current: int = 0  # already B's at T: skipped
    items_without_text: list[int] = field(default_factory=list)  # no catalogue text at or before T
    users_written: int = 0  # user rows written (re-stamped at T or rewritten after it)
    users_current: int = 0  # user rows already B's: skipped
    seconds: float = 0.0
    # item_tokens partition -> offset after the last record `publish` sent (the record's tokens_through)
    tokens_through: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["items_without_text"] = len(self.items_without_text)
        return d


def texts_at(events: Iterable, at: int) -> dict[int, str]:
    """{item_id: text} of each item's latest item event with text at or before `at`."""
    out: dict[int, tuple[int, str]] = {}
    for ev in events:
        if ev.event_time <= at and ev.text.strip():
            cur = out.get(ev.item_id)
            if cur is None or ev.event_time >= cur[0]:
                out[ev.item_id] = (ev.event_time, ev.text)
    return {k: v[1] for k, v in out.items()}


def read_rows(repo: Path, view: str) -> list[dict]:
    """Every (entity, event time)'s winning row of `view`'s part files, `event_timestamp` in epoch s."""
    import duckdb

    key = JOIN_KEYS[view]
    glob = str(offline_dir(repo, view) / "*.parquet").replace("'", "''")
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        rel = con.sql(f"SELECT * FROM read_parquet('{glob}', union_by_name = true) QUALIFY row_number() "
                      f"OVER (PARTITION BY {key}, event_timestamp ORDER BY created DESC NULLS LAST) = 1")
        to_table = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table  # duckdb 2 / older
        rows = to_table().to_pylist()
    finally:
        con.close()
    for r in rows:
        ts = r["event_timestamp"]
        r["event_timestamp"] = int(ts.timestamp()) if isinstance(ts, datetime) else int(ts)
        r.pop("created", None)
    return rows


def backfill(cfg: BackfillConfig, tokenizer, texts: dict[int, str],
             publish: Callable[[list[dict]], dict[int, int] | None] | None = None) -> BackfillReport:
    """Steps 1-4 of the module docstring; `tokenizer` is the new artifact B (HybridTokenizer)."""
    start = time.perf_counter()
    sink = FeastSink(cfg.repo, writer_id=f"backfill-{tokenizer.version}")
    rep = BackfillReport(tokenizer.version, cfg.at)
    # 1. the stores' rows
    item_rows, user_rows = read_rows(cfg.repo, ITEMS), read_rows(cfg.repo, USERS)
    # 2. items
    b_gen = _write_items(cfg, sink, tokenizer, texts, item_rows, publish, rep)
    # 3. user histories
    _write_users(cfg, sink, tokenizer.version, tokenizer.num_levels, b_gen, user_rows, rep)
    # 4. the record
    rot = read_rotation(cfg.repo)
    rep.seconds = round(time.perf_counter() - start, 3)
    if rot is not None and rot.to_version == tokenizer.version and rot.at == cfg.at and not rot.backfilled:
        from dataclasses import replace

        write_rotation(cfg.repo, replace(rot, backfilled_at=time.time(), backfill=rep.to_dict(),
                                         tokens_through=dict(rep.tokens_through) or None))
    return rep


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled)


def _write_items(cfg: BackfillConfig, sink: FeastSink, tok, texts: dict[int, str], rows: list[dict],
                 publish, rep: BackfillReport) -> dict[int, list[int]]:
    """Step 2; returns B's gen-tokens of every item that has them (written now or before)."""
    T, version = cfg.at, tok.version
    live: dict[int, dict] = {}  # item -> its latest row at or before T
    newest: dict[int, int] = {}
    b_gen: dict[int, tuple[int, list[int]]] = {}  # item -> (event time, B's gen-tokens) of its latest B row
    for r in rows:
        iid, ts = r["item_id"], r["event_timestamp"]
        newest[iid] = max(newest.get(iid, ts), ts)
        if ts <= T and (iid not in live or ts > live[iid]["event_timestamp"]):
            live[iid] = r
        if r.get("tokenizer_version") == version and (iid not in b_gen or ts > b_gen[iid][0]):
            b_gen[iid] = (ts, list(r["gen_tokens"]))
    # items the workers already tokenized with B after T (an update processed mid-rotation): their
    # caches hold those newer tokens, as the online store does; the row at T must not replace them
    newer_b = {iid for iid, (ts, _) in b_gen.items() if ts > T}
    todo = []
    for iid in sorted(live):
        r = live[iid]
        if r["event_timestamp"] == T and r.get("tokenizer_version") == version:
            rep.items_current += 1
        elif not texts.get(iid):
            rep.items_without_text.append(iid)
        else:
            todo.append(r)
    with _bar(len(todo), "backfill items", cfg.progress) as bar:
        for k in range(0, len(todo), cfg.batch):
            chunk = todo[k:k + cfg.batch]
            out = []
            for r, t in zip(chunk, tok.encode_texts([texts[r["item_id"]] for r in chunk])):
                out.append({"item_id": r["item_id"], "gen_tokens": list(t.gen_tokens), "mem_tokens": list(t.mem_tokens),
                            "coarse_tokens": list(t.coarse_tokens),
                            # the item event's categories and title words, not the artifact's: kept from
                            # its latest row <= T
                            "lexical_tokens": list(r.get("lexical_tokens") or []), "tokenizer_version": version,
                            "created_at": r.get("created_at"), "retired": bool(r.get("retired")),
                            "event_timestamp": T})
                b_gen[r["item_id"]] = (T, list(t.gen_tokens))
            sink.write_offline(ITEMS, out)
            sink.write_online(ITEMS, [r for r in out if newest[r["item_id"]] <= T])  # never over a newer row
            pub = [r for r in out if r["item_id"] not in newer_b]  # last record wins in the caches
            if publish is not None and pub:
                for p, o in (publish(pub) or {}).items():
                    rep.tokens_through[str(p)] = max(rep.tokens_through.get(str(p), 0), o)
            rep.items_written += len(out)
            bar.update(len(out))
    return {iid: g for iid, (_, g) in b_gen.items()}


def _chunks(flat: list[int] | None, n: int, L: int) -> list[list[int] | None]:
    """`flat` cut into the n events' L tokens each; None per event when it does not split."""
    flat = list(flat or [])
    if len(flat) != n * L:
        return [None] * n
    return [flat[i * L:(i + 1) * L] for i in range(n)]


def retokened(row: dict, b_gen: dict[int, list[int]], L: int, version: str, at: int | None = None) -> dict:
    """`row` with every event's tokens B's (an item B has no tokens of keeps its own), stamped at
    `at` (default: its own time)."""
    hist, recent = list(row.get("hist_item_ids") or []), list(row.get("recent_item_ids") or [])
    h_old = _chunks(row.get("hist_gen_tokens"), len(hist), L)
    r_old = _chunks(row.get("recent_gen_tokens"), len(recent), L)
    hg = [x for i, o in zip(hist, h_old) for x in (b_gen.get(i) or o or [-1] * L)]
    rg = [x for i, o in zip(recent, r_old) for x in (b_gen.get(i) or o or [-1] * L)]
    return {**row, "hist_gen_tokens": hg, "recent_gen_tokens": rg, "tokenizer_version": version,
            "event_timestamp": row["event_timestamp"] if at is None else at}


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("hist_gen_tokens", "recent_gen_tokens", "tokenizer_version",
                                               "event_timestamp"))


def _write_users(cfg: BackfillConfig, sink: FeastSink, version: str, L: int, b_gen: dict[int, list[int]],
                 rows: list[dict], rep: BackfillReport) -> None:
    """Step 3."""
    T = cfg.at
    by_user: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_user[r["user_id"]].append(r)
    versioned = "tokenizer_version" in sink.schemas[USERS].names  # a repo applied before rows carried it
    offline, online = [], []
    with _bar(len(by_user), "backfill users", cfg.progress) as bar:
        for uid in sorted(by_user):
            urows = sorted(by_user[uid], key=lambda r: r["event_timestamp"])
            out = []
            before = [r for r in urows if r["event_timestamp"] < T]
            if before and not any(r["event_timestamp"] == T for r in urows):
                out.append(retokened(before[-1], b_gen, L, version, at=T))
            for r in urows:
                if r["event_timestamp"] >= T:
                    new = retokened(r, b_gen, L, version)
                    if not versioned:
                        new["tokenizer_version"] = r.get("tokenizer_version")
                    if _same(new, r):
                        rep.users_current += 1
                    else:
                        out.append(new)
            offline.extend(out)
            newest = max(urows[-1]["event_timestamp"], T if before else -1)
            online.extend(r for r in out if r["event_timestamp"] == newest)
            bar.update(1)
            if len(offline) >= cfg.batch * 8:
                _flush_users(sink, offline, online, rep)
    _flush_users(sink, offline, online, rep)


def _flush_users(sink: FeastSink, offline: list[dict], online: list[dict], rep: BackfillReport) -> None:
    if offline:
        sink.write_offline(USERS, offline)
        rep.users_written += len(offline)
    if online:
        sink.write_online(USERS, online)
    offline.clear()
    online.clear()
