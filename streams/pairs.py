"""Co-interaction pairs for the tokenizer's collaborative alignment, one parquet part per batch.

A pair is two items one user liked within `window` consecutive positives (the same definition as
`tokenizer.alignment.mine_pairs`), stored unordered (item_a < item_b) with the user and the later
event's time. Part files are append-only; `load_pair_counts` dedups on (user, a, b, event_time),
so a batch replayed after a crash does not inflate counts.
"""
from __future__ import annotations

import os
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PAIR_SCHEMA = pa.schema([("item_a", pa.int64()), ("item_b", pa.int64()), ("user_id", pa.int64()),
                         ("event_time", pa.int64())])


class PairWriter:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seq = 0

    def write(self, a: list[int], b: list[int], user: list[int], event_time: list[int]) -> Path | None:
        """One part file of pairs given as columns (item_a < item_b)."""
        if not a:
            return None
        table = pa.table({"item_a": pa.array(a, pa.int64()), "item_b": pa.array(b, pa.int64()),
                          "user_id": pa.array(user, pa.int64()), "event_time": pa.array(event_time, pa.int64())},
                         schema=PAIR_SCHEMA)
        self._seq += 1
        final = self.dir / f"pairs-{self._tag}-{self._seq:06d}.parquet"
        tmp = self.dir / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        return final


def load_pairs(directory: str | Path) -> pa.Table:
    files = sorted(Path(directory).glob("pairs-*.parquet"))
    if not files:
        return PAIR_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=PAIR_SCHEMA) for f in files])


def load_pair_counts(directory: str | Path) -> Counter:
    """{(item_a, item_b): number of distinct (user, event_time) co-likes}."""
    t = load_pairs(directory)
    seen = set(zip(t["user_id"].to_pylist(), t["item_a"].to_pylist(), t["item_b"].to_pylist(),
                   t["event_time"].to_pylist()))
    return Counter((a, b) for _, a, b, _ in seen)
