"""Embedding tables: level-offset gen-tokens, and hashed tables for open-ended id spaces.

Padding is -1 everywhere: padded slots look up row 0 and are zeroed by their mask, so tables
carry no padding row and every row is a real parameter.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_HASH_MUL = 0x5BD1E995  # odd multiplier (MurmurHash2's), keeps x*mul below 2**63 for x < 2**31
_HASH_MOD = (1 << 31) - 1


def hash_ids(ids: torch.Tensor, buckets: int, seed: int = 0) -> torch.Tensor:
    """Map arbitrary non-negative int64 ids into [0, buckets); -1 (padding) maps to 0."""
    x = torch.remainder(ids.clamp_min(0), _HASH_MOD)
    x = torch.remainder(x * _HASH_MUL + seed, _HASH_MOD)
    return torch.remainder(x, buckets)


class GenTokenEmbedding(nn.Module):
    """Gen-token table: L*K level-offset ids plus one "unknown" row per level (item without tokens)."""

    def __init__(self, num_levels: int, codebook_size: int, d_model: int):
        super().__init__()
        self.num_levels, self.codebook_size = num_levels, codebook_size
        self.weight_table = nn.Embedding(num_levels * codebook_size + num_levels, d_model)
        nn.init.normal_(self.weight_table.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids (..., L) level-offset, -1 = padding -> (..., L, D), padding rows zero
        mask = (ids >= 0).unsqueeze(-1)
        return self.weight_table(ids.clamp_min(0)) * mask

    def level_weights(self, level: int) -> torch.Tensor:
        """(K, D) rows of one level, for an output layer tied to the input table."""
        k = self.codebook_size
        return self.weight_table.weight[level * k:(level + 1) * k]


class HashedBagEmbedding(nn.Module):
    """Mean of hashed embeddings over a bag of ids (mem-tokens, n-grams, a history of item IDs)."""

    def __init__(self, buckets: int, d_model: int, seed: int = 0):
        super().__init__()
        self.buckets, self.seed = buckets, seed
        self.table = nn.Embedding(buckets, d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        # ids (..., M), -1 = padding -> (..., M, D), padding rows zero
        mask = (ids >= 0).unsqueeze(-1)
        return self.table(hash_ids(ids, self.buckets, self.seed)) * mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids (B, M) -> (B, D) mean over non-padding ids; an empty bag gives zeros
        n = (ids >= 0).sum(-1, keepdim=True).clamp_min(1)
        return self.lookup(ids).sum(-2) / n
