"""Comparison tokenizations from the paper's Figure 3: 2-grams and SEMID prefix n-grams of gen ids.

Ids are stable 63-bit hashes (blake2b, not Python's salted `hash`) so they agree across processes
and machines; the ranker hashes them again into its own embedding table.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

_MASK = (1 << 63) - 1


def _hash(tag: bytes, gen: Sequence[int]) -> int:
    payload = tag + struct.pack(f"<{len(gen)}q", *(int(g) for g in gen))
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") & _MASK


def two_gram(gen: Sequence[int]) -> list[int]:
    """Ids of consecutive pairs (gen[0], gen[1]), (gen[1], gen[2]), ...: L−1 ids."""
    return [_hash(b"2g", gen[i:i + 2]) for i in range(len(gen) - 1)]


def prefix_ngram(gen: Sequence[int]) -> list[int]:
    """SEMID prefix n-grams: ids of gen[:1], gen[:2], ..., gen[:L]: L ids."""
    return [_hash(b"px", gen[:i + 1]) for i in range(len(gen))]
