"""Joined Feast rows -> padded tensors: the `Featurizer` turns a PIT-joined frame into a `Batch`.

Missing features arrive as null/NaN. An item with no usable tokens (not yet tokenized, wrong
length, out-of-range ids, or another tokenizer version) is still scored: it gets the per-level
"unknown" gen-tokens and an empty wide side, and is counted in `FeaturizeStats`.

The joined columns it reads are `READS`, exactly the Feast FeatureService the trainer's join
fetches (feature_repo/definitions.py, `trainer.pit_join.FEATURE_SERVICE`;
tests/test_feature_definitions.py checks they agree). `created_at` is also the item age the
metrics bucket by. The request-time features (rates, recency, token affinity) are trainer/features.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import pandas as pd
import torch

from tokenizer.lexical import LEXICAL_END, MAX_LEXICAL_TOKENS

from .batch import Batch
from .features import COUNT_COLUMNS, dense_features, era_keys
from .models.config import RankerConfig

ITEM_COLUMNS = ("gen_tokens", "mem_tokens", "coarse_tokens", "lexical_tokens", "tokenizer_version", "retired",
                "created_at")
MAX_COARSE = 8  # most coarse tokens (nearest level-1 codes) read per item
MAX_LEXICAL = MAX_LEXICAL_TOKENS  # most lexical tokens read per item (19: all the item agent writes)
HISTORY_COLUMNS = ("hist_gen_tokens", "hist_item_ids")
RECENT_COLUMNS = ("recent_item_ids", "recent_gen_tokens", "recent_labels", "last_event_time")
STAT_COLUMNS = COUNT_COLUMNS
USER_CELLS = ("hist_gen_tokens", "hist_item_ids", "recent_gen_tokens", "recent_item_ids", "recent_labels")
READS = ITEM_COLUMNS + HISTORY_COLUMNS + RECENT_COLUMNS + STAT_COLUMNS  # joined columns `Featurizer.__call__` reads


@dataclass
class FeaturizeStats:
    rows: int = 0
    unknown_item: int = 0  # no usable tokens: scored with the unknown token
    stale_version: int = 0  # tokens from another tokenizer version (subset of unknown_item)
    retired: int = 0
    no_history: int = 0

    def add(self, other: "FeaturizeStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _ints(v) -> list[int] | None:
    """A Feast array cell as a list of ints; None for null/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return [int(x) for x in v]


def user_groups(df: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(first row of each distinct (user_id, event_time), each row's group) or (None, None).

    Why: a point-in-time joined user feature is a function of (user, second): every row of one user
    in one second carries the same history (in serving, every candidate of a request does). Parsing
    it once per group instead of once per row is what makes a 100-candidate request cheap."""
    if len(df) < 2 or "user_id" not in df.columns or "event_time" not in df.columns:
        return None, None
    u = pd.to_numeric(df["user_id"], errors="coerce").to_numpy()
    t = pd.to_numeric(df["event_time"], errors="coerce").to_numpy()
    if np.isnan(u.astype(float)).any() or np.isnan(t.astype(float)).any():
        return None, None
    key = np.stack([u.astype(np.int64), t.astype(np.int64)], 1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    if len(first) == len(df):
        return None, None
    return first, inverse.reshape(-1)


def _pad(rows: list[list[int]], width: int, keep: str = "head") -> torch.Tensor:
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:width] if keep == "head" else r[-width:] if r else r
        out[i, :len(r)] = r
    return torch.from_numpy(out)


@dataclass
class Featurizer:
    """Turns a joined frame into a `Batch` under one tokenizer geometry and version."""

    num_levels: int
    codebook_size: int
    hist_len: int = 20
    recent_len: int = 20
    max_wide: int = 8
    tokenizer_version: str | None = None  # rows with another version are treated as unknown items
    ngrams: bool = True  # compute two_gram / prefix_ngram (tokenizer.ngrams) for those baselines
    _ngram_fns: tuple[Callable, Callable] | None = field(default=None, repr=False)
    _ngram_cache: dict = field(default_factory=dict, repr=False)  # gen tuple -> (two_gram, prefix_ngram)

    @classmethod
    def for_config(cls, cfg: RankerConfig, tokenizer_version: str | None = None, ngrams: bool = True) -> "Featurizer":
        return cls(cfg.num_levels, cfg.codebook_size, cfg.hist_len, cfg.recent_len, cfg.max_wide, tokenizer_version,
                   ngrams)

    def _ngram_functions(self) -> tuple[Callable, Callable]:
        if self._ngram_fns is None:
            from tokenizer.ngrams import prefix_ngram, two_gram  # comparison tokenizations (contract)
            self._ngram_fns = (two_gram, prefix_ngram)
        return self._ngram_fns

    def _valid_gen(self, gen: list[int] | None) -> bool:
        L, K = self.num_levels, self.codebook_size
        return gen is not None and len(gen) == L and all(l * K <= g < (l + 1) * K for l, g in enumerate(gen))

    def __call__(self, df: pd.DataFrame) -> tuple[Batch, FeaturizeStats]:
        L, K, H = self.num_levels, self.codebook_size, self.hist_len
        n = len(df)
        st = FeaturizeStats(rows=n)
        unknown = [L * K + l for l in range(L)]
        col = lambda c: df[c].tolist() if c in df.columns else [None] * n  # noqa: E731
        gens, mems, coarse, lex, known = [], [], [], [], []
        versions = col("tokenizer_version")
        for g, m, c, v, a in zip(col("gen_tokens"), col("mem_tokens"), col("coarse_tokens"), versions,
                                 col("lexical_tokens")):
            g = _ints(g)
            ok = self._valid_gen(g)
            if ok and self.tokenizer_version is not None and v != self.tokenizer_version:
                ok = False
                st.stale_version += 1
            known.append(ok)
            gens.append(g if ok else unknown)
            mems.append((_ints(m) or []) if ok else [])
            c = (_ints(c) or []) if ok else []
            coarse.append(c if all(0 <= x < K for x in c) else [])  # level-1 codes; a bad list is dropped
            # the item event's categories and title words: content of the item, not of the artifact, so read even when
            # its tokens are unusable (another version); a bad list is dropped
            a = _ints(a) or []
            lex.append(a if all(0 <= x < LEXICAL_END for x in a) else [])
        st.unknown_item = n - sum(known)
        st.retired = sum(1 for r in col("retired") if r is True or r == 1)

        # the user's side is parsed once per (user, second) and shared by that group's rows
        first, inverse = user_groups(df)
        cells = {c: col(c) for c in USER_CELLS}
        if first is not None:
            cells = {c: [v[j] for j in first] for c, v in cells.items()}
        n_u = len(cells["recent_labels"])
        hist_gen = np.full((n_u, H, L), -1, dtype=np.int64)
        for i, h in enumerate(cells["hist_gen_tokens"]):
            h = _ints(h) or []
            h = h[len(h) % L:]  # whole items only
            items = np.asarray(h, dtype=np.int64).reshape(-1, L)[-H:]
            hist_gen[i, :len(items)] = items
        hist_ids = _pad([_ints(h) or [] for h in cells["hist_item_ids"]], H, keep="tail")
        recent_gen, recent_ids, recent_labels = self._recent(cells["recent_gen_tokens"], cells["recent_item_ids"],
                                                             cells["recent_labels"], unknown)
        if inverse is not None:
            idx = torch.from_numpy(inverse)
            hist_gen, hist_ids = hist_gen[inverse], hist_ids[idx]
            recent_gen, recent_ids, recent_labels = recent_gen[idx], recent_ids[idx], recent_labels[idx]
        st.no_history = int((hist_gen[:, 0, 0] < 0).sum())

        gen = torch.tensor(gens, dtype=torch.int64).view(n, L)
        lexical = _pad(lex, MAX_LEXICAL)
        stats = dense_features(df, gen.numpy(), np.asarray(known, dtype=bool), recent_gen.numpy(),
                               recent_labels.numpy(), hist_gen)

        batch = Batch(
            label=torch.tensor(df["label"].to_numpy(np.float32)),
            known=torch.tensor(known, dtype=torch.bool),
            stats=torch.from_numpy(stats),
            gen=gen,
            mem=_pad(mems, self.max_wide),
            coarse=_pad(coarse, MAX_COARSE),
            lexical=lexical,
            era=torch.from_numpy(era_keys(lexical.numpy(), df["event_time"].to_numpy(np.int64)
                                          if "event_time" in df.columns else None)),
            hist_gen=torch.from_numpy(hist_gen),
            item_id=torch.tensor(df["item_id"].to_numpy(np.int64)),
            hist_ids=hist_ids,
            recent_gen=recent_gen,
            recent_ids=recent_ids,
            recent_labels=recent_labels,
            user_id=torch.tensor(df["user_id"].to_numpy(np.int64)) if "user_id" in df.columns else None,
            event_time=torch.tensor(df["event_time"].to_numpy(np.int64)) if "event_time" in df.columns else None,
        )
        if self.ngrams:
            grams = [self._ngrams(g) if k else ([], []) for g, k in zip(gens, known)]
            batch.two_gram = _pad([g[0] for g in grams], self.max_wide)
            batch.prefix_ngram = _pad([g[1] for g in grams], self.max_wide)
        return batch, st

    def _recent(self, gens: list, ids: list, labels: list, unknown: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The user's last `recent_len` labelled events, oldest first, right-aligned; -1 pads.

        An event whose item tokens are unusable keeps its label and gets the unknown tokens."""
        L, R = self.num_levels, self.recent_len
        n = len(labels)
        out_gen = np.full((n, R, L), -1, dtype=np.int64)
        out_ids = np.full((n, R), -1, dtype=np.int64)
        out_lab = np.full((n, R), -1, dtype=np.int64)
        for i in range(n):
            lab = _ints(labels[i]) or []
            if not lab:
                continue
            k = min(len(lab), R)
            out_lab[i, R - k:] = lab[-k:]
            rid = _ints(ids[i]) or []
            if len(rid) == len(lab):
                out_ids[i, R - k:] = rid[-k:]
            g = _ints(gens[i]) or []
            rows = [g[j * L:(j + 1) * L] for j in range(len(lab))] if len(g) == len(lab) * L else [None] * len(lab)
            for j, row in enumerate(rows[-k:]):
                out_gen[i, R - k + j] = row if self._valid_gen(row) else unknown
        return torch.from_numpy(out_gen), torch.from_numpy(out_ids), torch.from_numpy(out_lab)

    def _ngrams(self, gen: list[int]) -> tuple[list[int], list[int]]:
        key = tuple(gen)
        hit = self._ngram_cache.get(key)
        if hit is None:
            two, prefix = self._ngram_functions()
            hit = self._ngram_cache[key] = (list(two(gen)), list(prefix(gen)))
        return hit
