"""User history: durable per-partition state of the interaction agent (one SQLite file per
partition of `interactions`), and every rule of a user's features — how an event enters the
user's state in order (`UserState.append`), how a late one is inserted and the state recomputed
from the base (`UserState.insert`), how detail is folded into the base (`UserState.fold`), and
the user's Feast row (`user_row`). The agent decides *whether* an event is applied (late,
duplicate, parked: interaction_agent.py); `PartitionState.apply` applies it.

Why per partition: the state follows the partition, so after a rebalance the new owner opens the
same file (a shared state directory), with its high-water mark (store.py). Only rows changed by a
batch are written: O(batch), not O(state).

Allowed lateness (`allowed_lateness_s`, the horizon H): the partition's *watermark* is the newest
event time it accepted. Exact detail is kept only for events within about H of it; older detail
is compacted into base values, so memory and the SQLite tables stay bounded by the events of one
horizon (plus the base values: one row per user):
  - per user (`UserState`): the applied events of the detail in event-time order, on top of
    `base` = (n_events, n_positives, last-N history, last-R recent list) before them; current
    state = base + detail. The recent list is the last `recent_len` applied events, negatives
    too, with their labels and gen-tokens (the ranker's labelled context), so a negative's
    gen-tokens are saved as well;
  - the dedup set: keys (user_id, item_id, event_time, label) of the accepted events, by
    event-time bucket (H/16 wide: expiry drops whole buckets).
SQLite: one `item_events` row per accepted event (dedup key, and user detail once applied to the
user: `tok` = the id of its gen-tokens in `tokens`, NULL while parked or if never applied; 0 in
files of older code for a negative, whose tokens were not saved: it enters the recent list with
L x -1 gen-tokens), `users` (the user's base, `recent` its recent list, NULL = empty in older
files, and `tc`, the time it was compacted up to) for the compacted part, `meta` for hwm,
watermark and cutoff. A batch inserts its rows; a compaction upserts the bases of the users it
compacted and deletes their rows: O(batch + compacted users), all in the hwm's transaction.

An event with event_time < watermark - H cannot be placed exactly any more and is refused
(`PartitionState.late`: the processor dead-letters it). User detail is compacted below
watermark - H (rounded down to a bucket; not for a user with parked events: those are placed
first, however old). If H is raised later, what was already compacted stays compacted: events
older than that stay late (`floor`).
"""
from __future__ import annotations

import bisect
import json
import sqlite3
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .store import DEFAULT_ALLOWED_LATENESS_S, PartitionStore

DEFAULT_RECENT_LEN = 20  # R: the applied events (positives and negatives) of a user's recent list

# what a positive's co-like neighbours come back as (`UserState.append`/`insert`): the item ids
# of the positives before it, and (item_id, event_time) of those after it (only for a late one)
Neighbours = tuple[list[int], Sequence[tuple[int, int]]]


def _t(e: tuple) -> int:
    return e[0]


# the tokens a row at event time t shows for an item (the artifact of t after a rotation:
# streams/rotation.py), or None: the tokens the event was applied with
Retoken = Callable[[int], Callable[[int], Sequence[int] | None] | None]


def user_row(uid: int, t: int, hist, n: int, npos: int, recent, gen_len: int,
             retoken: Callable[[int], Sequence[int] | None] | None = None, version: str | None = None) -> dict:
    """The user's `user_history` Feast row at event time t: the state after its events <= t, so
    its newest event is at t (`last_event_time`). A recent event without known gen-tokens (a
    negative saved by older code) has `gen_len` x -1. `retoken` (item id -> tokens, or None to
    keep the applied ones): after a rotation every event of a row at or after its time shows the
    new artifact's tokens, older events too, so one row never mixes two artifacts' ids.
    `version`: the artifact of the row's tokens (`tokenizer_version`; left out when unknown)."""
    if retoken is not None:
        hist = [(h[0], h[1], retoken(h[0]) or h[2]) for h in hist]
        recent = [(r[0], r[1], r[2], retoken(r[0]) or r[3]) for r in recent]
    gen: list[int] = []
    for r in recent:
        gen.extend((-1,) * gen_len if r[3] is None else r[3])
    row = {"user_id": uid, "event_timestamp": t, "hist_gen_tokens": [x for h in hist for x in h[2]],
           "hist_item_ids": [h[0] for h in hist], "user_n_events": n, "user_n_positives": npos,
           "recent_item_ids": [r[0] for r in recent], "recent_gen_tokens": gen,
           "recent_labels": [r[2] for r in recent], "last_event_time": t}
    if version is not None:
        row["tokenizer_version"] = version
    return row


@dataclass(slots=True)
class UserState:
    # current state: every applied event (base + detail)
    n_events: int = 0
    n_positives: int = 0
    # last N positives, oldest first: (item_id, event_time, gen_tokens)
    history: deque = field(default_factory=deque)
    # last R applied events, positives and negatives, oldest first:
    # (item_id, event_time, label, gen_tokens|None); None: not saved by older code (a negative)
    recent: deque = field(default_factory=deque)
    # detail within the horizon, in event-time order: (event_time, item_id, label, gen_tokens|None);
    # None when empty (then the base is the current state)
    events: list | None = None
    # (n_events, n_positives, history tuple, recent tuple) before the first detail event; None
    # when `events` is
    base: tuple | None = None

    def append(self, ev: tuple, history_len: int, recent_len: int, window: int = 0) -> list[int] | None:
        """Apply `ev` = (event_time, item_id, label, gen_tokens|None), not older than the user's
        newest event: counted, it enters the recent list, which keeps the last `recent_len`, and
        a positive enters the history, which keeps the last `history_len`. For a positive and a
        `window`: the item ids of the up to `window` positives before it, oldest first (its
        co-like neighbours); else None."""
        evs = self.events
        if evs is None:  # the first event within the horizon: the base is the state before it
            self.base = (self.n_events, self.n_positives, tuple(self.history), tuple(self.recent))
            evs = self.events = []
        evs.append(ev)
        self.n_events += 1
        rec = self.recent
        rec.append((ev[1], ev[0], ev[2], ev[3]))
        while len(rec) > recent_len:
            rec.popleft()
        if not ev[2]:
            return None
        self.n_positives += 1
        hist = self.history
        before = None
        if window:
            n = len(hist)
            before = [hist[k][0] for k in range(max(0, n - window), n)]
        hist.append((ev[1], ev[0], ev[3]))
        while len(hist) > history_len:
            hist.popleft()
        return before

    def insert(self, ev: tuple, history_len: int, recent_len: int, window: int, uid: int, rows: dict,
               gen_len: int, retoken_at: Retoken | None = None,
               version_at: Callable[[int], str | None] | None = None) -> Neighbours | None:
        """Place `ev`, older than the user's newest event, at its event-time position and recompute
        the state from the base (the rule of `append`, replayed), putting the row of every event
        time >= its own into `rows` ((user, t) -> row: they are re-stamped; `gen_len`: see
        `user_row`; `retoken_at`/`version_at`: per row time, its `retoken` and `version`). For a
        positive and a `window`: its neighbours, the up to min(window, history_len) positives on
        either side."""
        evs = self.events
        t = ev[0]
        k = bisect.bisect_right(evs, t, key=_t)
        evs.insert(k, ev)
        n, npos, hist, rec = self.base
        hist, rec = deque(hist), deque(rec)
        window = min(window, history_len)
        near = ([], []) if window and ev[2] else None
        for j, (tj, ij, lj, gj) in enumerate(evs):
            n += 1
            rec.append((ij, tj, lj, gj))
            while len(rec) > recent_len:
                rec.popleft()
            if lj:
                npos += 1
                if near is not None:
                    if j == k:  # the late positive: the positives before it
                        near[0].extend(h[0] for h in list(hist)[len(hist) - min(window, len(hist)):])
                    elif j > k and len(near[1]) < window:  # it is in the window of the next `window`
                        near[1].append((ij, tj))
                hist.append((ij, tj, gj))
                while len(hist) > history_len:
                    hist.popleft()
            if j >= k and (j + 1 == len(evs) or evs[j + 1][0] != tj):
                rows[(uid, tj)] = user_row(uid, tj, hist, n, npos, rec, gen_len,
                                           retoken_at(tj) if retoken_at else None,
                                           version_at(tj) if version_at else None)
        self.n_events, self.n_positives, self.history, self.recent = n, npos, hist, rec
        return near

    def fold(self, cut: int, history_len: int, recent_len: int) -> None:
        """Compaction: fold the detail older than `cut` into the base."""
        evs = self.events
        k = bisect.bisect_left(evs, cut, key=_t)
        n, npos, hist, rec = self.base
        pos = [e for e in evs[:k] if e[2]]
        n, npos = n + k, npos + len(pos)
        hl, rl = history_len, recent_len
        hist = (list(hist) + [(e[1], e[0], e[3]) for e in pos[-hl:]])[-hl:] if hl else []
        rec = (list(rec) + [(e[1], e[0], e[2], e[3]) for e in evs[max(0, k - rl):k]])[-rl:] if rl else []
        del evs[:k]
        if evs:
            self.base = (n, npos, tuple(hist), tuple(rec))
        else:
            self.events = self.base = None  # the base is the current state

    def base_values(self) -> tuple[int, int, list, list]:
        """(n_events, n_positives, history, recent) before the detail: what the `users` row holds."""
        if self.events is None:
            return self.n_events, self.n_positives, list(self.history), list(self.recent)
        n, npos, hist, rec = self.base
        return n, npos, list(hist), list(rec)


@dataclass
class Parked:
    """An interaction waiting for its item's tokens (or behind another one of the same user)."""
    offset: int
    key: bytes | None
    value: bytes
    user_id: int
    item_id: int
    label: int
    event_time: int
    parked_at: float  # wall clock, for the dead-letter bound


def tokens_blob(toks) -> bytes:
    return array("q", toks).tobytes()


def _blob_tokens(b: bytes | None) -> tuple | None:
    if b is None:
        return None
    a = array("q")
    a.frombytes(b)
    return tuple(a)


class PartitionState(PartitionStore):
    """The user history of one partition of `interactions` (see the module docstring)."""

    SCHEMA = """
            CREATE TABLE IF NOT EXISTS users (user_id INTEGER PRIMARY KEY, n_events INTEGER, n_positives INTEGER, history TEXT);
            CREATE TABLE IF NOT EXISTS item_events (item_id INTEGER, t INTEGER, label INTEGER);
            CREATE TABLE IF NOT EXISTS tokens (vid INTEGER PRIMARY KEY, item_id INTEGER, gen BLOB);
            CREATE TABLE IF NOT EXISTS parked (off INTEGER PRIMARY KEY, key BLOB, value BLOB, user_id INTEGER,
                item_id INTEGER, label INTEGER, event_time INTEGER, parked_at REAL);
            CREATE INDEX IF NOT EXISTS parked_user ON parked (user_id);
        """

    def __init__(self, path: str | Path, history_len: int,
                 allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S, recent_len: int = DEFAULT_RECENT_LEN):
        self.history_len = history_len
        self.recent_len = recent_len
        # set by the interaction processor across a rotation (user_row's `retoken` and `version`)
        self.retoken_at: Retoken | None = None
        self.version_at: Callable[[int], str | None] | None = None
        super().__init__(path, allowed_lateness_s)

    def _migrate(self) -> None:
        # files written before dedup/compaction: add the columns (old rows: not user detail)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(item_events)")}
        for c in ("user_id", "tok"):
            if c not in cols:
                self.db.execute(f"ALTER TABLE item_events ADD COLUMN {c} INTEGER")
        ucols = {r[1] for r in self.db.execute("PRAGMA table_info(users)")}
        if "tc" not in ucols:
            self.db.execute("ALTER TABLE users ADD COLUMN tc INTEGER")
        if "recent" not in ucols:  # files from before the recent list: NULL = an empty one
            self.db.execute("ALTER TABLE users ADD COLUMN recent TEXT")
        self.db.executescript("""
            DROP INDEX IF EXISTS item_events_id;
            DROP INDEX IF EXISTS item_events_it;
            CREATE INDEX IF NOT EXISTS item_events_ut ON item_events (user_id, t);
        """)

    def _load(self, meta: dict[str, int]) -> None:
        self.watermark: int = meta.get("watermark", -1)  # newest accepted event time; -1: none yet
        # compaction point reached so far (a multiple of bucket_s; never lowered, even if the
        # allowed lateness grows):
        # every user's detail older than user_cutoff is in its base, except users with parked
        # events (their `tc`)
        self.user_cutoff: int = meta.get("user_cutoff", -1)
        # gen-token lists of the user detail's events, saved once per (item, token list)
        vids: dict[int, tuple] = {}
        self._tok: dict[int, tuple] = {}  # item -> (token list seen, tuple, vid)
        for vid, iid, gen in self.db.execute("SELECT vid, item_id, gen FROM tokens ORDER BY vid"):
            vids[vid] = _blob_tokens(gen)
            self._tok[iid] = (None, vids[vid], vid)
        self._next_vid = max(vids, default=0) + 1
        # L, the gen-tokens per item (the newest list's): -1 x L stand for tokens older code did not save
        self.gen_len = len(vids[self._next_vid - 1]) if vids else 0
        hl, rl = self.history_len, self.recent_len
        self.users: dict[int, UserState] = {}
        tcs: dict[int, int] = {}
        for uid, n, npos, hist, tc, rec in self.db.execute(
                "SELECT user_id, n_events, n_positives, history, tc, recent FROM users"):
            recent = json.loads(rec)[-rl:] if rec and rl else []
            self.users[uid] = UserState(n, npos, deque((i, t, tuple(g)) for i, t, g in json.loads(hist)),
                                        deque((i, t, lab, None if g is None else tuple(g)) for i, t, lab, g in recent))
            tcs[uid] = -1 if tc is None else tc
        # the dedup set, by event-time bucket (so expiry drops whole sets): per bucket the keys
        # (user_id, item_id, event_time, label) of the accepted events and their users
        self._ubuckets: dict[int, tuple[set, set]] = {}
        B, ucut = self.bucket_s, self.user_cutoff
        # one row per accepted event: dedup key, and user detail (tok not NULL: applied to the
        # user; t >= the user's compaction point)
        for iid, t, lab, uid, tok in self.db.execute(
                "SELECT item_id, t, label, user_id, tok FROM item_events ORDER BY t, rowid"):
            if uid is None:
                continue
            if t >= ucut:
                b = t // B
                ub = self._ubuckets.get(b)
                if ub is None:
                    ub = self._ubuckets[b] = (set(), set())
                ub[0].add((uid, iid, t, lab))
                ub[1].add(uid)
            if tok is not None and t >= tcs.get(uid, -1):
                u = self.users.get(uid)
                if u is None:
                    u = self.users[uid] = UserState()
                # tok = 0: a negative saved by older code, its tokens unknown
                u.append((t, iid, lab, vids[tok] if tok else None), hl, rl)
        self.parked: dict[int, deque[Parked]] = {}
        for r in self.db.execute("SELECT * FROM parked ORDER BY off"):
            p = Parked(*r)
            self.parked.setdefault(p.user_id, deque()).append(p)
        # users whose compaction waits for their parked events to be placed: tried every save
        self._compact_later: set[int] = {uid for uid, u in self.users.items()
                                         if u.events and u.events[0][0] < ucut}
        # rows to insert: (item_id, t, label, user_id, tok); tok None while not applied to the user
        self.new_rows: list[tuple] = []
        self.applied_later: list[tuple] = []  # (tok, item_id, t, user_id, label) of rows inserted parked
        self._new_tokens: list[tuple] = []
        self._compacted_users: dict[int, int] = {}  # user -> cutoff of its compaction (unsaved)
        self._dropped_rows: dict[int, int] = {}  # user -> cutoff below which its rows go (unsaved)
        self._parked_new: list[Parked] = []
        self._parked_done: list[int] = []

    def token_ref(self, iid: int, cur) -> tuple[tuple, int]:
        """(tokens tuple, saved version id) of an item's current token list; saved once per list."""
        c = self._tok.get(iid)
        if c is None or c[0] is not cur:
            tup = tuple(cur)
            if c is not None and c[1] == tup:  # the same tokens (e.g. after a restart): same version
                c = self._tok[iid] = (cur, c[1], c[2])
            else:
                vid = self._next_vid
                self._next_vid += 1
                c = self._tok[iid] = (cur, tup, vid)
                self._new_tokens.append((vid, iid, tokens_blob(tup)))
                self.gen_len = len(tup)
        return c[1], c[2]

    # -- acceptance --
    def floor(self) -> int:
        """The oldest event time still placed exactly: older is late (dead-lettered)."""
        if self.watermark < 0:
            return self.user_cutoff
        return max(self.watermark - self.allowed_lateness_s, self.user_cutoff)

    def late(self, t: int) -> str | None:
        """Why an event at `t` is too late to place exactly, or None if it is not."""
        floor = self.floor()
        if t >= floor:
            return None
        return (f"late: event_time={t} is {self.watermark - t} s older than the watermark {self.watermark} "
                f"(the newest event time of partition {self.path.stem.rsplit('-p', 1)[-1]}); allowed lateness is "
                f"{self.allowed_lateness_s} s and older state is compacted, so it cannot be placed exactly: "
                f"not counted (item counters, user features and pairs skip it)")

    def accept(self, uid: int, iid: int, t: int, label: int) -> bool:
        """Add an interaction to the dedup set and the watermark; False if it is a duplicate."""
        key = (uid, iid, t, label)
        b = t // self.bucket_s
        ub = self._ubuckets.get(b)
        if ub is None:
            ub = self._ubuckets[b] = (set(), set())
        elif key in ub[0]:
            return False
        ub[0].add(key)
        ub[1].add(uid)
        if t > self.watermark:
            self.watermark = t
        return True

    # -- mutation (in memory; `save` makes it durable) --
    def apply(self, uid: int, iid: int, label: int, t: int, tokens, rows: dict, window: int = 0,
              parked: bool = False) -> Neighbours | None:
        """Apply one accepted (not late, not a duplicate) event to its user: in order, or inserted
        at its event-time position when older than the user's newest event; the user's rows it
        changed go into `rows` ((user, t) -> row). `tokens`: the item's gen-tokens (required for
        a positive; a negative's enter its recent list, and None there saves none, tok = 0).
        `parked`: its row was saved when it was accepted. Returns a positive's co-like neighbours
        within `window` (UserState.append/insert), else None."""
        u = self.users.get(uid)
        if u is None:
            u = self.users[uid] = UserState()
        if label or tokens is not None:
            toks, tok = self.token_ref(iid, tokens)
        else:
            toks, tok = None, 0
        if parked:
            self.applied_later.append((tok, iid, t, uid, label))
        else:
            self.new_rows.append((iid, t, label, uid, tok))
        evs = u.events
        if evs and evs[-1][0] > t:
            return u.insert((t, iid, label, toks), self.history_len, self.recent_len, window, uid, rows,
                            self.gen_len, self.retoken_at, self.version_at)
        before = u.append((t, iid, label, toks), self.history_len, self.recent_len, window)
        rows[(uid, t)] = user_row(uid, t, u.history, u.n_events, u.n_positives, u.recent, self.gen_len,
                                  self.retoken_at(t) if self.retoken_at else None,
                                  self.version_at(t) if self.version_at else None)
        return None if before is None else (before, ())

    def park(self, p: Parked) -> None:
        """An accepted event that cannot be applied yet: its row (not applied to the user) and its
        place in the user's queue."""
        self.new_rows.append((p.item_id, p.event_time, p.label, p.user_id, None))
        self.parked.setdefault(p.user_id, deque()).append(p)
        self._parked_new.append(p)

    def unpark(self, p: Parked) -> None:
        q = self.parked[p.user_id]
        if q[0] is p:
            q.popleft()
        else:  # a ready prefix is unparked in event-time order, which need not be arrival order
            q.remove(p)
        if not q:
            del self.parked[p.user_id]
        self._parked_done.append(p.offset)

    def n_parked(self) -> int:
        return sum(len(q) for q in self.parked.values())

    def _on_log_reset(self, db: sqlite3.Connection) -> None:
        """Parked events take negative offsets so they cannot collide with the new log's (the
        partition commits nothing until they are placed or dead-lettered). Features are kept."""
        parked = sorted((p for q in self.parked.values() for p in q), key=lambda p: p.offset)
        for k, p in enumerate(parked):
            new = k - len(parked)
            db.execute("UPDATE parked SET off=? WHERE off=?", (new, p.offset))
            p.offset = new

    def n_detail(self) -> tuple[int, int]:
        """(user detail events, dedup keys) held in memory: bounded by the horizon."""
        return (sum(len(u.events) for u in self.users.values() if u.events),
                sum(len(k) for k, _ in self._ubuckets.values()))

    # -- compaction (in memory; `save` writes it in the same transaction as the hwm) --
    def compact(self) -> None:
        """Fold user detail older than the horizon (watermark - H) into the base values; whole
        buckets of the dedup set expire once they are entirely older than the cutoff, and the
        rows of their users older than it go."""
        if self.watermark < 0:
            return
        H, B = self.allowed_lateness_s, self.bucket_s
        cut = (self.watermark - H) // B * B  # whole buckets: every key older than it is in one dropped
        if cut > self.user_cutoff:
            self.user_cutoff = cut
            todo = self._compact_later
            for b in [b for b in self._ubuckets if (b + 1) * B <= cut]:
                todo.update(self._ubuckets.pop(b)[1])
        if self._compact_later:
            cut = self.user_cutoff
            parked = self.parked
            for uid in list(self._compact_later):
                if uid in parked:
                    continue  # its parked events are placed first (they may be older than the cutoff)
                self._compact_later.discard(uid)
                self._dropped_rows[uid] = cut
                u = self.users.get(uid)
                if u is not None and u.events and u.events[0][0] < cut:
                    u.fold(cut, self.history_len, self.recent_len)
                    self._compacted_users[uid] = cut

    # -- save (PartitionStore.save: one transaction with the high-water mark) --
    def _write(self, db: sqlite3.Connection) -> None:
        """New rows (one per accepted event), compactions, parking changes. O(batch + entities
        compacted)."""
        if self._new_tokens:
            db.executemany("INSERT INTO tokens VALUES (?,?,?)", self._new_tokens)
        if self.new_rows:
            db.executemany("INSERT INTO item_events (item_id, t, label, user_id, tok) VALUES (?,?,?,?,?)",
                           self.new_rows)
        if self.applied_later:  # parked when accepted, applied to the user since
            db.executemany("UPDATE item_events SET tok=? WHERE item_id=? AND t=? AND user_id=? AND label=?",
                           self.applied_later)
        done = set(self._parked_done)
        new = [p for p in self._parked_new if p.offset not in done]
        if new:
            db.executemany("INSERT OR REPLACE INTO parked VALUES (?,?,?,?,?,?,?,?)",
                           [(p.offset, p.key, p.value, p.user_id, p.item_id, p.label, p.event_time,
                             p.parked_at) for p in new])
        stale = done - {p.offset for p in self._parked_new}
        if stale:
            db.executemany("DELETE FROM parked WHERE off=?", [(o,) for o in stale])
        if self._compacted_users:
            rows = []
            for uid, cut in self._compacted_users.items():
                n, npos, hist, rec = self.users[uid].base_values()
                rows.append((uid, n, npos, json.dumps([[i, t, list(g)] for i, t, g in hist]), cut,
                             json.dumps([[i, t, lab, None if g is None else list(g)] for i, t, lab, g in rec])))
            db.executemany("INSERT OR REPLACE INTO users (user_id, n_events, n_positives, history, tc, recent) "
                           "VALUES (?,?,?,?,?,?)", rows)
        if self._dropped_rows:  # dedup keys expired, user detail in the base
            db.executemany("DELETE FROM item_events WHERE user_id=? AND t<?", list(self._dropped_rows.items()))
            # rows of files from before per-user rows (no user): older than every user's cutoff
            db.execute("DELETE FROM item_events WHERE user_id IS NULL AND t<?", (self.user_cutoff,))

    def _meta_values(self) -> list[tuple[str, int]]:
        return [("watermark", self.watermark), ("user_cutoff", self.user_cutoff)]

    def _saved(self) -> None:
        self._new_tokens.clear()
        self.new_rows.clear()
        self.applied_later.clear()
        self._compacted_users.clear()
        self._dropped_rows.clear()
        self._parked_new.clear()
        self._parked_done.clear()

