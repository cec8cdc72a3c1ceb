"""Item counts: durable state of one partition of `interactions_by_item` (the item-stats agent).

Item counters are not kept with the user history: the interaction agent forwards every accepted
event to the item-keyed `interactions_by_item` topic, and the item-stats agent counts them per
item here (one SQLite file per partition of that topic).
"""
from __future__ import annotations

import bisect
import sqlite3

from .store import PartitionStore


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


class ItemStatsState(PartitionStore):
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
    transaction with the high-water mark (PartitionStore.save), O(batch + compacted items).
    """

    SCHEMA = """
            CREATE TABLE IF NOT EXISTS events (item_id INTEGER, t INTEGER, label INTEGER, user_id INTEGER);
            CREATE INDEX IF NOT EXISTS events_it ON events (item_id, t);
            CREATE TABLE IF NOT EXISTS base (item_id INTEGER PRIMARY KEY, n INTEGER, npos INTEGER);
            CREATE TABLE IF NOT EXISTS sources (src INTEGER PRIMARY KEY, wm INTEGER);
        """

    def _load(self, meta: dict[str, int]) -> None:
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

    # -- save (PartitionStore.save: one transaction with the high-water mark) --
    def _write(self, db: sqlite3.Connection) -> None:
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

    def _meta_values(self) -> list[tuple[str, int]]:
        return [("cutoff", self.cutoff), ("n_sources", self.n_sources)]

    def _saved(self) -> None:
        self.new_rows.clear()
        self._compacted.clear()
        self._base_changed.clear()
        self._sources_changed = False
