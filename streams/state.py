"""Durable per-partition state of the interaction agent (one SQLite file per input partition).

Why per partition: the state follows the partition, so after a rebalance the new owner opens the
same file (a shared state directory). Why a high-water mark: `hwm` is the last input offset whose
effects are in this state; it is saved in the same transaction as the state, *after* the Feast
write and before the Kafka commit, so a replay skips offsets <= hwm instead of counting them
twice, and a replay of offsets > hwm recomputes the same values from the same saved state.
Only rows changed by a batch are written: O(batch), not O(state).
"""
from __future__ import annotations

import bisect
import json
import sqlite3
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class UserState:
    n_events: int = 0
    n_positives: int = 0
    # last N positives, oldest first: (item_id, event_time, gen_tokens)
    history: deque = field(default_factory=deque)


class ItemEvents:
    """Sorted event times of one item's interactions and the cumulative positives at each."""
    __slots__ = ("times", "cum_pos")

    def __init__(self):
        self.times: list[int] = []
        self.cum_pos: list[int] = []

    def add(self, t: int, label: int) -> None:
        times, cum = self.times, self.cum_pos
        if not times or times[-1] <= t:  # the usual case: in event-time order, O(1)
            times.append(t)
            cum.append((cum[-1] if cum else 0) + label)
            return
        k = bisect.bisect_right(times, t)  # late: insert and shift the running count after it
        times.insert(k, t)
        cum.insert(k, (cum[k - 1] if k else 0) + label)
        for j in range(k + 1, len(cum)):
            cum[j] += label

    def counts_at(self, t: int) -> tuple[int, int]:
        """(interactions, positives) with event_time <= t."""
        k = bisect.bisect_right(self.times, t)
        return k, (self.cum_pos[k - 1] if k else 0)

    def times_from(self, t: int) -> list[int]:
        return self.times[bisect.bisect_left(self.times, t):]


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


class PartitionState:
    def __init__(self, path: str | Path, history_len: int):
        self.path = Path(path)
        self.history_len = history_len
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript("""
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER);
            CREATE TABLE IF NOT EXISTS users (user_id INTEGER PRIMARY KEY, n_events INTEGER, n_positives INTEGER, history TEXT);
            CREATE TABLE IF NOT EXISTS item_events (item_id INTEGER, t INTEGER, label INTEGER);
            CREATE INDEX IF NOT EXISTS item_events_id ON item_events (item_id);
            CREATE TABLE IF NOT EXISTS parked (off INTEGER PRIMARY KEY, key BLOB, value BLOB, user_id INTEGER,
                item_id INTEGER, label INTEGER, event_time INTEGER, parked_at REAL);
        """)
        row = self.db.execute("SELECT v FROM meta WHERE k='hwm'").fetchone()
        self.hwm: int = row[0] if row else -1
        self.users: dict[int, UserState] = {}
        for uid, n, npos, hist in self.db.execute("SELECT user_id, n_events, n_positives, history FROM users"):
            self.users[uid] = UserState(n, npos, deque((i, t, tuple(g)) for i, t, g in json.loads(hist)))
        # per item: event times of every interaction in this partition (sorted) and the running count
        # of positives; item counters at time t are counts over them, so a late event re-stamps
        # exactly the rows after it
        self.items: dict[int, ItemEvents] = {}
        for i, t, lab in self.db.execute("SELECT item_id, t, label FROM item_events ORDER BY t, rowid"):
            self.items.setdefault(i, ItemEvents()).add(t, lab)
        self.parked: dict[int, deque[Parked]] = {}
        for r in self.db.execute("SELECT * FROM parked ORDER BY off"):
            p = Parked(*r)
            self.parked.setdefault(p.user_id, deque()).append(p)
        self._dirty_users: set[int] = set()
        self._new_item_events: list[tuple[int, int, int]] = []
        self._parked_new: list[Parked] = []
        self._parked_done: list[int] = []

    # -- mutation (in memory; `save` makes it durable) --
    def user(self, uid: int) -> UserState:
        st = self.users.get(uid)
        if st is None:
            st = self.users[uid] = UserState()
        self._dirty_users.add(uid)
        return st

    def add_item_event(self, iid: int, t: int, label: int) -> None:
        evs = self.items.get(iid)
        if evs is None:
            evs = self.items[iid] = ItemEvents()
        evs.add(t, label)
        self._new_item_events.append((iid, t, label))

    def park(self, p: Parked) -> None:
        self.parked.setdefault(p.user_id, deque()).append(p)
        self._parked_new.append(p)

    def unpark(self, p: Parked) -> None:
        q = self.parked[p.user_id]
        assert q[0] is p
        q.popleft()
        if not q:
            del self.parked[p.user_id]
        self._parked_done.append(p.offset)

    def n_parked(self) -> int:
        return sum(len(q) for q in self.parked.values())

    def save(self, hwm: int | None = None) -> None:
        """One transaction: changed users/items, parking changes, high-water mark."""
        with self.db:
            if self._dirty_users:
                self.db.executemany(
                    "INSERT OR REPLACE INTO users VALUES (?,?,?,?)",
                    [(u, s.n_events, s.n_positives, json.dumps([[i, t, list(g)] for i, t, g in s.history]))
                     for u in self._dirty_users for s in (self.users[u],)])
            if self._new_item_events:
                self.db.executemany("INSERT INTO item_events VALUES (?,?,?)", self._new_item_events)
            done = set(self._parked_done)
            new = [p for p in self._parked_new if p.offset not in done]
            if new:
                self.db.executemany("INSERT OR REPLACE INTO parked VALUES (?,?,?,?,?,?,?,?)",
                                    [(p.offset, p.key, p.value, p.user_id, p.item_id, p.label, p.event_time,
                                      p.parked_at) for p in new])
            stale = done - {p.offset for p in self._parked_new}
            if stale:
                self.db.executemany("DELETE FROM parked WHERE off=?", [(o,) for o in stale])
            if hwm is not None and hwm > self.hwm:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('hwm', ?)", (hwm,))
                self.hwm = hwm
        self._dirty_users.clear()
        self._new_item_events.clear()
        self._parked_new.clear()
        self._parked_done.clear()

    def close(self) -> None:
        self.db.close()


def read_item_events(path: str | Path, item_ids: list[int]) -> dict[int, ItemEvents]:
    """Item events saved by another partition's owner (read-only; for multi-worker sums)."""
    p = Path(path)
    if not p.exists() or not item_ids:
        return {}
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        out = {}
        for chunk in range(0, len(item_ids), 500):
            ids = item_ids[chunk:chunk + 500]
            q = f"SELECT item_id, t, label FROM item_events WHERE item_id IN ({','.join('?' * len(ids))}) ORDER BY t"
            for i, t, lab in db.execute(q, ids):
                out.setdefault(i, ItemEvents()).add(t, lab)
        return out
    finally:
        db.close()
