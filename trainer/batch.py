"""The padded model inputs every ranker reads: one `Batch` per joined micro-batch.

Built by `trainer.featurizer.Featurizer` from the point-in-time joined Feast rows; each model
sees only the fields in its `inputs` (`Batch.select`), so a baseline cannot read what it must not.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch


@dataclass
class Batch:
    """Padded model inputs; -1 pads id tensors. A model reads only the fields in its `inputs`."""

    label: torch.Tensor  # (B,) float 0/1
    known: torch.Tensor  # (B,) bool: the item had usable tokens
    stats: torch.Tensor  # (B, F) request-time features, trainer/features.py DENSE_FEATURES (first 4: log1p counts)
    gen: torch.Tensor | None = None  # (B, L) level-offset gen ids; unknown -> L*K + level
    mem: torch.Tensor | None = None  # (B, M) mem-token ids
    coarse: torch.Tensor | None = None  # (B, C) the item's nearest level-1 codes, nearest first; [:, 0] = gen[:, 0]
    lexical: torch.Tensor | None = None  # (B, 19) the item's category, title-word, release-year tokens (tokenizer/lexical.py), -1 pads
    era: torch.Tensor | None = None  # (B, 2) the item's decade and release-age bucket at the event (features.era_keys), -1 unknown
    hist_gen: torch.Tensor | None = None  # (B, H, L) history items' gen ids, oldest first
    two_gram: torch.Tensor | None = None  # (B, M) 2-gram ids of gen (comparison tokenization)
    prefix_ngram: torch.Tensor | None = None  # (B, M) prefix n-gram ids (SEMID)
    item_id: torch.Tensor | None = None  # (B,) ID baseline only
    hist_ids: torch.Tensor | None = None  # (B, H) ID baseline only
    recent_gen: torch.Tensor | None = None  # (B, R, L) the user's last R labelled events' gen ids, oldest first
    recent_ids: torch.Tensor | None = None  # (B, R) their item ids: ID baseline only
    recent_labels: torch.Tensor | None = None  # (B, R) their labels 0/1; -1 pads (left)
    # who and when: never a model input (no family lists them); the per-user online weights
    # (models/user_weights.py) key on the user and order their updates by the second
    user_id: torch.Tensor | None = None  # (B,)
    event_time: torch.Tensor | None = None  # (B,) epoch s

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def select(self, names: Sequence[str]) -> "Batch":
        """A copy holding only `names` (others None): what a model is allowed to read."""
        keep = set(names) | {"label", "known", "stats"}
        return replace(self, **{f.name: None for f in fields(self) if f.name not in keep})

    def to(self, device: torch.device | str) -> "Batch":
        """The same inputs on `device` (the trainer's models may sit on a GPU; its table never does)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def slice(self, sl: slice) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                                if getattr(self, f.name) is not None})


def chunk_bounds(seconds: torch.Tensor | None, step: int, n: int) -> list[int]:
    """[0, ..., n]: cuts about every `step` rows, each moved on to the next change of second, so no
    second is split between two chunks (a chunk is scored, then trained on: a second split in two
    would have its later rows scored after its earlier rows' labels were learned). Within one
    micro-batch; a second that batch_cut split across micro-batches stays split."""
    if seconds is None or n == 0:
        return list(range(0, n, step)) + [n] if n else [0]
    t = seconds.cpu().numpy()
    cuts, s = [0], step
    while s < n:
        while s < n and t[s] == t[s - 1]:
            s += 1
        if s < n:
            cuts.append(s)
        s += step
    return cuts + [n]


LONGEST_BATCH = 8  # × the batch size: the most rows one second may hold a batch open for


def batch_cut(seconds: Sequence[int], size: int, final: bool = False, longest: int | None = None) -> int:
    """How many of the head of `seconds` (event-time ordered) form the next micro-batch, so that no
    second is split between two micro-batches (each is scored, then trained on, as its chunks are),
    but for the exceptions below: there, later rows of the second are scored by weights that learned
    its earlier rows.

    At most `size` rows, cut back to the last change of second among them: the rest of that second
    waits for the next batch. A batch that would be one second throughout extends to that second's
    end. Where a second ends is known only from a row of a later second: without one, 0 (wait for
    more rows), or with `final` (no more rows will come: end of stream, `max_events`) all of them.
    A function of the sequence alone, so batches stay a function of the topic's contents. `final`
    can end a batch inside a second (a run stopped at `max_events`, an idle stream): the rest of
    that second comes in the next batch.

    A second longer than `longest` rows (default LONGEST_BATCH × size) is split after `longest`:
    without a bound, a stream with coarse timestamps (a backfill stamping thousands of events with
    one second) would hold them all in memory before training. The caller warns (`splits_second`)."""
    longest = LONGEST_BATCH * size if longest is None else max(longest, size)
    n = len(seconds)
    if n <= size:
        return n if final else 0
    for k in range(size, 0, -1):  # the last change of second within the first `size` rows
        if seconds[k] != seconds[k - 1]:
            return k
    for k in range(size + 1, min(n, longest + 1)):  # one second throughout: to its end, at most `longest`
        if seconds[k] != seconds[k - 1]:
            return k
    if n > longest:
        return longest  # the second goes on past `longest` rows: split it
    return n if final else 0


def splits_second(seconds: Sequence[int], k: int) -> bool:
    """Whether a batch of the first `k` of `seconds` ends inside a second (rows k-1 and k share it)."""
    return 0 < k < len(seconds) and seconds[k] == seconds[k - 1]
