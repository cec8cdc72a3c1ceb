"""Durable per-partition state of the interaction agent (one SQLite file per input partition).

Why per partition: the state follows the partition, so after a rebalance the new owner opens the
same file (a shared state directory). Why a high-water mark: `hwm` is the last input offset whose
effects are in this state; it is saved in the same transaction as the state, *after* the Feast
write and before the Kafka commit, so a replay skips offsets <= hwm instead of counting them
twice, and a replay of offsets > hwm recomputes the same values from the same saved state.
Only rows changed by a batch are written: O(batch), not O(state).

Allowed lateness (`allowed_lateness_s`, the horizon H): the partition's *watermark* is the newest
event time it accepted. Exact detail is kept only for events within about H of it; older detail
is compacted into base values, so memory and the SQLite tables stay bounded by the events of one
horizon (plus the base values: one row per user):
  - per user (`UserState`): the applied events of the detail in event-time order, on top of
    `base` = (n_events, n_positives, last-N history) before them; current state = base + detail;
  - the dedup set: keys (user_id, item_id, event_time, label) of the accepted events, by
    event-time bucket (H/16 wide: expiry drops whole buckets).
SQLite: one `item_events` row per accepted event (dedup key, and user detail once applied to the
user: `tok` = 0 for a negative, the id of its gen-tokens in `tokens` for a positive, NULL while
parked or if never applied), `users` (the user's base and `tc`, the time it was compacted up to)
for the compacted part, `meta` for hwm, watermark and cutoff. A batch inserts its rows; a
compaction upserts the bases of the users it compacted and deletes their rows: O(batch +
compacted users), all in the hwm's transaction.

An event with event_time < watermark - H cannot be placed exactly any more and is refused
(`PartitionState.late`: the processor dead-letters it). User detail is compacted below
watermark - H (rounded down to a bucket; not for a user with parked events: those are placed
first, however old). If H is raised later, what was already compacted stays compacted: events
older than that stay late (`floor`).

Item counters are not kept here: the interaction agent forwards every accepted event to the
item-keyed `interactions_by_item` topic, and the item-stats agent counts them per item
(`ItemStatsState` below: one SQLite file per partition of that topic).
"""
from __future__ import annotations

import bisect
import json
import sqlite3
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ALLOWED_LATENESS_S = 7 * 86_400  # event-time seconds: a week


def _t(e: tuple) -> int:
    return e[0]


@dataclass(slots=True)
class UserState:
    # current state: every applied event (base + detail)
    n_events: int = 0
    n_positives: int = 0
    # last N positives, oldest first: (item_id, event_time, gen_tokens)
    history: deque = field(default_factory=deque)
    # detail within the horizon, in event-time order: (event_time, item_id, label, gen_tokens|None);
    # None when empty (then the base is the current state)
    events: list | None = None
    # (n_events, n_positives, history tuple) before the first detail event; None when `events` is
    base: tuple | None = None


class ItemEvents:
    """One item's interactions in one partition: sorted event times of the detail, the running
    count of positives at each (including the base), and the compacted base counts."""
    __slots__ = ("times", "cum_pos", "base_n", "base_pos")

    def __init__(self, base_n: int = 0, base_pos: int = 0):
        self.times: list[int] = []
        self.cum_pos: list[int] = []
        self.base_n = base_n  # interactions compacted away (all older than every time in `times`)
        self.base_pos = base_pos

    def add(self, t: int, label: int) -> None:
        times, cum = self.times, self.cum_pos
        if not times or times[-1] <= t:  # the usual case: in event-time order, O(1)
            times.append(t)
            cum.append((cum[-1] if cum else self.base_pos) + label)
            return
        k = bisect.bisect_right(times, t)  # late: insert and shift the running count after it
        times.insert(k, t)
        cum.insert(k, (cum[k - 1] if k else self.base_pos) + label)
        if label:
            for j in range(k + 1, len(cum)):
                cum[j] += 1

    def counts_at(self, t: int) -> tuple[int, int]:
        """(interactions, positives) with event_time <= t (t not older than the detail)."""
        k = bisect.bisect_right(self.times, t)
        return self.base_n + k, (self.cum_pos[k - 1] if k else self.base_pos)

    def add_base(self, label: int) -> None:
        """Count an event older than every detail time (and than the compaction cutoff) in the base."""
        self.base_n += 1
        if label:
            self.base_pos += 1
            self.cum_pos = [c + 1 for c in self.cum_pos]

    def compact(self, cutoff: int) -> bool:
        """Fold the detail older than `cutoff` into the base; True if anything moved."""
        k = bisect.bisect_left(self.times, cutoff)
        if not k:
            return False
        self.base_n += k
        self.base_pos = self.cum_pos[k - 1]
        del self.times[:k]
        del self.cum_pos[:k]
        return True


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


class PartitionState:
    def __init__(self, path: str | Path, history_len: int,
                 allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S):
        self.path = Path(path)
        self.history_len = history_len
        self.allowed_lateness_s = int(allowed_lateness_s)
        self.bucket_s = max(1, self.allowed_lateness_s // 16)  # compaction granularity (event time)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript("""
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
            CREATE TABLE IF NOT EXISTS users (user_id INTEGER PRIMARY KEY, n_events INTEGER, n_positives INTEGER, history TEXT);
            CREATE TABLE IF NOT EXISTS item_events (item_id INTEGER, t INTEGER, label INTEGER);
            CREATE TABLE IF NOT EXISTS tokens (vid INTEGER PRIMARY KEY, item_id INTEGER, gen BLOB);
            CREATE TABLE IF NOT EXISTS parked (off INTEGER PRIMARY KEY, key BLOB, value BLOB, user_id INTEGER,
                item_id INTEGER, label INTEGER, event_time INTEGER, parked_at REAL);
            CREATE INDEX IF NOT EXISTS parked_user ON parked (user_id);
        """)
        # files written before dedup/compaction: add the columns (old rows: not user detail)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(item_events)")}
        for c in ("user_id", "tok"):
            if c not in cols:
                self.db.execute(f"ALTER TABLE item_events ADD COLUMN {c} INTEGER")
        if "tc" not in {r[1] for r in self.db.execute("PRAGMA table_info(users)")}:
            self.db.execute("ALTER TABLE users ADD COLUMN tc INTEGER")
        self.db.executescript("""
            DROP INDEX IF EXISTS item_events_id;
            DROP INDEX IF EXISTS item_events_it;
            CREATE INDEX IF NOT EXISTS item_events_ut ON item_events (user_id, t);
        """)
        self.db.commit()
        meta = dict(self.db.execute("SELECT k, v FROM meta"))
        self.hwm: int = meta.get("hwm", -1)
        self.watermark: int = meta.get("watermark", -1)  # newest accepted event time; -1: none yet
        # compaction point reached so far (a multiple of bucket_s; never lowered, even if the
        # allowed lateness grows):
        # every user's detail older than user_cutoff is in its base, except users with parked
        # events (their `tc`)
        self.user_cutoff: int = meta.get("user_cutoff", -1)
        # gen-token lists of the user detail's positives, saved once per (item, token list)
        vids: dict[int, tuple] = {}
        self._tok: dict[int, tuple] = {}  # item -> (token list seen, tuple, vid)
        for vid, iid, gen in self.db.execute("SELECT vid, item_id, gen FROM tokens ORDER BY vid"):
            vids[vid] = _blob_tokens(gen)
            self._tok[iid] = (None, vids[vid], vid)
        self._next_vid = max(vids, default=0) + 1
        hl = history_len
        self.users: dict[int, UserState] = {}
        tcs: dict[int, int] = {}
        for uid, n, npos, hist, tc in self.db.execute("SELECT user_id, n_events, n_positives, history, tc FROM users"):
            self.users[uid] = UserState(n, npos, deque((i, t, tuple(g)) for i, t, g in json.loads(hist)))
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
                if u.events is None:
                    u.base = (u.n_events, u.n_positives, tuple(u.history))
                    u.events = []
                toks = vids[tok] if lab else None
                u.events.append((t, iid, lab, toks))
                u.n_events += 1
                if lab:
                    u.n_positives += 1
                    u.history.append((iid, t, toks))
                    if len(u.history) > hl:
                        u.history.popleft()
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
    def user(self, uid: int) -> UserState:
        st = self.users.get(uid)
        if st is None:
            st = self.users[uid] = UserState()
        return st

    def park(self, p: Parked) -> None:
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

    def reset_log(self) -> None:
        """The input log was replaced by a new one (a memory broker restarted; see
        batch_loop._position): its offsets restart at 0, so the high-water mark is void, and parked
        events take negative offsets so they cannot collide with the new log's (the partition
        commits nothing until they are placed or dead-lettered). Features are kept."""
        parked = sorted((p for q in self.parked.values() for p in q), key=lambda p: p.offset)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', -1)")
            for k, p in enumerate(parked):
                new = k - len(parked)
                self.db.execute("UPDATE parked SET off=? WHERE off=?", (new, p.offset))
                p.offset = new
        self.hwm = -1

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
                    self._compact_user(u, cut)
                    self._compacted_users[uid] = cut

    def _compact_user(self, u: UserState, cut: int) -> None:
        evs = u.events
        k = bisect.bisect_left(evs, cut, key=_t)
        n, npos, hist = u.base
        pos = [e for e in evs[:k] if e[2]]
        n, npos = n + k, npos + len(pos)
        hl = self.history_len
        hist = (list(hist) + [(e[1], e[0], e[3]) for e in pos[-hl:]])[-hl:] if hl else []
        del evs[:k]
        if evs:
            u.base = (n, npos, tuple(hist))
        else:
            u.events = u.base = None  # the base is the current state

    def _user_base(self, uid: int) -> tuple[int, int, list]:
        u = self.users[uid]
        if u.events is None:
            return u.n_events, u.n_positives, list(u.history)
        n, npos, hist = u.base
        return n, npos, list(hist)

    def save(self, hwm: int | None = None) -> None:
        """One transaction: new rows (one per accepted event), compactions, parking changes,
        watermark and cutoffs, high-water mark. O(batch + entities compacted)."""
        db = self.db
        with db:
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
                    n, npos, hist = self._user_base(uid)
                    rows.append((uid, n, npos, json.dumps([[i, t, list(g)] for i, t, g in hist]), cut))
                db.executemany("INSERT OR REPLACE INTO users (user_id, n_events, n_positives, history, tc) "
                               "VALUES (?,?,?,?,?)", rows)
            if self._dropped_rows:  # dedup keys expired, user detail in the base
                db.executemany("DELETE FROM item_events WHERE user_id=? AND t<?", list(self._dropped_rows.items()))
                # rows of files from before per-user rows (no user): older than every user's cutoff
                db.execute("DELETE FROM item_events WHERE user_id IS NULL AND t<?", (self.user_cutoff,))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("watermark", self.watermark), ("user_cutoff", self.user_cutoff)])
            if hwm is not None and hwm > self.hwm:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', ?)", (hwm,))
                self.hwm = hwm
        self._new_tokens.clear()
        self.new_rows.clear()
        self.applied_later.clear()
        self._compacted_users.clear()
        self._dropped_rows.clear()
        self._parked_new.clear()
        self._parked_done.clear()

    def close(self) -> None:
        self.db.close()


class ItemStatsState:
    """Durable state of one partition of `interactions_by_item` (the item-stats agent): per item the
    `ItemEvents` of the detail on top of compacted base counts, the dedup set, the high-water mark.

    Records come from every partition of `interactions` (each item's events from every user), each
    carrying its source partition, that partition's watermark when it accepted the event, and how
    many partitions `interactions` has. A source partition never accepts an event older than its
    watermark - H afterwards, so detail is compacted only below the lowest watermark of the
    sources minus H (bucket-aligned), and only once every source partition has been heard from
    (as before the repartition, a partition that accepted nothing holds item compaction back):
    every later record still finds the detail at its time, and counts stay exact. A record older
    than the cutoff (only if `interactions` gained partitions) is counted in the item's base:
    later rows are re-stamped with it, rows before the cutoff are not (`folded`).

    Duplicates (a replay of the interaction agent between its produce and its commit) are dropped
    by their key (user_id, item_id, event_time, label), kept by event-time bucket above the cutoff.
    SQLite: `events` one row per accepted event above the cutoff, `base` per compacted item,
    `sources` the watermark of each source partition, `meta` hwm and cutoff; all saved in one
    transaction with the high-water mark (before the offset commit), O(batch + compacted items).
    """

    def __init__(self, path: str | Path, allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S):
        self.path = Path(path)
        self.allowed_lateness_s = int(allowed_lateness_s)
        self.bucket_s = max(1, self.allowed_lateness_s // 16)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript("""
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
            CREATE TABLE IF NOT EXISTS events (item_id INTEGER, t INTEGER, label INTEGER, user_id INTEGER);
            CREATE INDEX IF NOT EXISTS events_it ON events (item_id, t);
            CREATE TABLE IF NOT EXISTS base (item_id INTEGER PRIMARY KEY, n INTEGER, npos INTEGER);
            CREATE TABLE IF NOT EXISTS sources (src INTEGER PRIMARY KEY, wm INTEGER);
        """)
        self.db.commit()
        meta = dict(self.db.execute("SELECT k, v FROM meta"))
        self.hwm: int = meta.get("hwm", -1)
        self.cutoff: int = meta.get("cutoff", -1)  # detail older than this is in the bases
        self.sources: dict[int, int] = dict(self.db.execute("SELECT src, wm FROM sources"))
        self.n_sources: int = meta.get("n_sources", 0)  # partitions of `interactions` (the most heard of)
        self.items: dict[int, ItemEvents] = {}
        for iid, n, npos in self.db.execute("SELECT item_id, n, npos FROM base"):
            self.items[iid] = ItemEvents(n, npos)
        # dedup keys (user_id, item_id, event_time, label) and items, by event-time bucket
        self._buckets: dict[int, tuple[set, set]] = {}
        B = self.bucket_s
        for iid, t, lab, uid in self.db.execute("SELECT item_id, t, label, user_id FROM events ORDER BY t, rowid"):
            self._add(uid, iid, t, lab, t // B)
        self.new_rows: list[tuple] = []
        self._compacted: dict[int, int] = {}  # item -> cutoff (unsaved)
        self._base_changed: set[int] = set()  # items with a folded event (unsaved)
        self._sources_changed = False

    def _add(self, uid: int, iid: int, t: int, label: int, b: int) -> None:
        bk = self._buckets.get(b)
        if bk is None:
            bk = self._buckets[b] = (set(), set())
        bk[0].add((uid, iid, t, label))
        bk[1].add(iid)
        evs = self.items.get(iid)
        if evs is None:
            evs = self.items[iid] = ItemEvents()
        evs.add(t, label)

    def accept(self, uid: int, iid: int, t: int, label: int, src: int, src_wm: int, n_src: int) -> str:
        """'ok' (counted in the detail), 'dup' (a copy of an accepted event: a no-op) or 'folded'
        (older than the cutoff: counted in the base)."""
        if src_wm > self.sources.get(src, -1):
            self.sources[src] = src_wm
            self._sources_changed = True
        if n_src > self.n_sources:
            self.n_sources = n_src
            self._sources_changed = True
        if t < self.cutoff:
            evs = self.items.get(iid)
            if evs is None:
                evs = self.items[iid] = ItemEvents()
            evs.add_base(label)
            self._base_changed.add(iid)
            return "folded"
        b = t // self.bucket_s
        bk = self._buckets.get(b)
        if bk is not None and (uid, iid, t, label) in bk[0]:
            return "dup"
        self._add(uid, iid, t, label, b)
        self.new_rows.append((iid, t, label, uid))
        return "ok"

    def n_detail(self) -> tuple[int, int]:
        """(item detail times, dedup keys) held in memory: bounded by the horizon."""
        return sum(len(e.times) for e in self.items.values()), sum(len(k) for k, _ in self._buckets.values())

    def compact(self) -> None:
        """Fold detail older than the lowest source watermark minus H into the bases."""
        if not self.sources or len(self.sources) < self.n_sources:
            return  # some source partition not heard from yet: it may still send old events
        B = self.bucket_s
        cut = (min(self.sources.values()) - self.allowed_lateness_s) // B * B
        if cut <= self.cutoff:
            return
        self.cutoff = cut
        todo: set[int] = set()
        for b in [b for b in self._buckets if (b + 1) * B <= cut]:
            todo.update(self._buckets.pop(b)[1])
        for iid in todo:
            if self.items[iid].compact(cut):
                self._compacted[iid] = cut

    def reset_log(self) -> None:
        """The input log was replaced by a new one (see PartitionState.reset_log): hwm void."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', -1)")
        self.hwm = -1

    def save(self, hwm: int | None = None) -> None:
        db = self.db
        with db:
            if self.new_rows:
                db.executemany("INSERT INTO events VALUES (?,?,?,?)", self.new_rows)
            changed = self._base_changed | set(self._compacted)
            if changed:
                items = self.items
                db.executemany("INSERT OR REPLACE INTO base VALUES (?,?,?)",
                               [(i, items[i].base_n, items[i].base_pos) for i in changed])
            if self._compacted:
                db.executemany("DELETE FROM events WHERE item_id=? AND t<?", list(self._compacted.items()))
            if self._sources_changed:
                db.executemany("INSERT OR REPLACE INTO sources VALUES (?,?)", list(self.sources.items()))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("cutoff", self.cutoff), ("n_sources", self.n_sources)])
            if hwm is not None and hwm > self.hwm:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', ?)", (hwm,))
                self.hwm = hwm
        self.new_rows.clear()
        self._compacted.clear()
        self._base_changed.clear()
        self._sources_changed = False

    def close(self) -> None:
        self.db.close()
