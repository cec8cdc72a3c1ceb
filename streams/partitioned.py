"""Per-input-partition durable state, shared by the stateful processors (interaction agent,
item-stats agent). The state follows the partition: opened on assignment, closed on revocation,
one SQLite file per partition in a shared directory, with the high-water mark that makes a replay
skip what was already applied (streams/state/store.py).
"""
from __future__ import annotations

from pathlib import Path

from .processor import BaseProcessor, record_mark


class PartitionedProcessor(BaseProcessor):
    """Subclasses set `state_dir`, `topic`, `states = {}` and implement `open_state(path)`."""

    state_dir: Path
    topic: str
    states: dict

    def open_state(self, path: Path):
        raise NotImplementedError

    def state_path(self, partition: int) -> Path:
        return self.state_dir / f"{self.topic}-p{partition}.sqlite"

    def assign(self, partitions: list[int]) -> None:
        for p in partitions:
            if p not in self.states:
                self.states[p] = self.open_state(self.state_path(p))

    def revoke(self, partitions: list[int]) -> None:
        for p in partitions:
            st = self.states.pop(p, None)
            if st is not None:
                st.close()

    def hwm(self, partition: int) -> int:
        return self.states[partition].hwm

    def hwm_mark(self, partition: int) -> int | None:
        return self.states[partition].hwm_mark

    def log_reset(self, partition: int) -> None:
        self.states[partition].reset_log()

    def admit(self, r, res) -> bool:
        """Note `r`'s offset in the batch's high-water marks; False (counted as skipped) when the
        partition's saved state already applied it — a replay after a crash."""
        st = self.states.get(r.partition)
        if st is None:
            self.assign([r.partition])
            st = self.states[r.partition]
        if r.offset > res.hwm.get(r.partition, -1):
            res.hwm[r.partition] = r.offset
            res.marks[r.partition] = record_mark(r.key, r.value)
        if r.offset <= st.hwm:
            res.skipped += 1
            return False
        return True

    def save(self, hwm: dict[int, int], marks: dict[int, int] | None = None) -> None:
        """Compact what is older than the horizon, then make the state, watermarks and high-water
        marks (with the fingerprints of their records) durable (when: `BatchLoop._process_and_commit`)."""
        for p, st in self.states.items():
            st.compact()
            st.save(hwm.get(p), (marks or {}).get(p))

    def reset(self) -> None:
        """Reopen every owned partition's state from its file: unsaved changes are gone."""
        parts = list(self.states)
        self.revoke(parts)
        self.assign(parts)

    def close(self) -> None:
        self.revoke(list(self.states))
