"""Gen-tokens by residual k-means (RQ-Kmeans, paper §3.2): L levels × K codes, fitted with faiss.

Level l clusters the residuals left by levels < l, so the first code is a coarse semantic group
(shared by many items → generalisation) and later codes refine it. Encoding is nearest centroid
per level on the same residual chain; it never refits, so a new item gets codes from the frozen
codebooks.

Defaults for ~10k items (MovieLens small): L=3, K=256. K=256 leaves ~38 items per first-level
code — faiss's rule of thumb is ≥39 points per centroid — so codes are well populated and
shared; 256³ ≈ 16.7M tuples ≫ 10k items keeps full-tuple collisions rare. The paper's 5×4096 is
sized for billions of items.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class QuantizerError(ValueError):
    """Bad input to the residual quantizer (shape, count or an unfitted codebook)."""


@dataclass
class RQStats:
    rel_mse: float  # ‖x − x̂‖² / ‖x‖², over all points
    rel_mse_per_level: list[float]  # the same after 1..L levels
    usage: list[float]  # share of the K codes used, per level
    perplexity: list[float]  # exp(entropy) of the code distribution, per level (max K)
    collision_rate: float  # share of items whose full tuple is shared with another item
    unique_tuples: int

    def as_dict(self) -> dict:
        return {"rel_mse": self.rel_mse, "rel_mse_per_level": self.rel_mse_per_level,
                "usage": self.usage, "perplexity": self.perplexity,
                "collision_rate": self.collision_rate, "unique_tuples": self.unique_tuples}


class ResidualKMeans:
    """Codebooks float32 [L, K, d]; `codes` are per-level indices in [0, K) (not level-offset)."""

    def __init__(self, codebooks: np.ndarray) -> None:
        if codebooks.ndim != 3:
            raise QuantizerError(f"codebooks must be [levels, K, dim], got shape {codebooks.shape}")
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
        self._indexes = None

    @property
    def levels(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def dim(self) -> int:
        return int(self.codebooks.shape[2])

    @classmethod
    def fit(cls, x: np.ndarray, levels: int, codebook_size: int, niter: int = 25, seed: int = 0,
            progress: bool = False) -> tuple["ResidualKMeans", np.ndarray]:
        """Fit L codebooks on x [N, d]; returns (quantizer, fit-time codes [N, L])."""
        import faiss

        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise QuantizerError(f"expected a 2-d array of embeddings, got shape {x.shape}")
        n, d = x.shape
        if n < codebook_size:
            raise QuantizerError(f"{n} items cannot fill a codebook of {codebook_size} codes: "
                                 f"lower codebook_size to at most {n}")
        residual = x.copy()
        books = np.zeros((levels, codebook_size, d), dtype=np.float32)
        codes = np.zeros((n, levels), dtype=np.int64)
        rng = range(levels)
        if progress:
            from tqdm import tqdm

            rng = tqdm(rng, desc="rq-kmeans", unit="level", leave=False)
        for lvl in rng:
            km = faiss.Kmeans(d, codebook_size, niter=niter, seed=seed + lvl, verbose=False,
                              max_points_per_centroid=1_000_000)
            km.train(residual)
            books[lvl] = km.centroids
            index = faiss.IndexFlatL2(d)
            index.add(books[lvl])
            _, assign = index.search(residual, 1)
            codes[:, lvl] = assign[:, 0]
            residual -= books[lvl][codes[:, lvl]]
        return cls(books), codes

    def _level_indexes(self):
        if self._indexes is None:
            import faiss

            self._indexes = []
            for lvl in range(self.levels):
                index = faiss.IndexFlatL2(self.dim)
                index.add(self.codebooks[lvl])
                self._indexes.append(index)
        return self._indexes

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Nearest centroid per level on the residual chain: int64 [N, L] in [0, K)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise QuantizerError(f"expected embeddings of shape [N, {self.dim}], got {x.shape}")
        residual = x.copy()
        codes = np.zeros((x.shape[0], self.levels), dtype=np.int64)
        for lvl, index in enumerate(self._level_indexes()):
            if len(residual) == 0:
                break
            _, assign = index.search(residual, 1)
            codes[:, lvl] = assign[:, 0]
            residual -= self.codebooks[lvl][codes[:, lvl]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the chosen centroids: the reconstruction x̂."""
        out = np.zeros((codes.shape[0], self.dim), dtype=np.float32)
        for lvl in range(codes.shape[1]):
            out += self.codebooks[lvl][codes[:, lvl]]
        return out

    def stats(self, x: np.ndarray, codes: np.ndarray) -> RQStats:
        """Reconstruction error, per-level usage and perplexity, full-tuple collision rate."""
        x = np.asarray(x, dtype=np.float64)
        denom = float((x ** 2).sum()) or 1.0
        recon = np.zeros_like(x)
        per_level = []
        for lvl in range(self.levels):
            recon += self.codebooks[lvl][codes[:, lvl]]
            per_level.append(float(((x - recon) ** 2).sum()) / denom)
        usage, perplexity = [], []
        for lvl in range(self.levels):
            counts = np.bincount(codes[:, lvl], minlength=self.codebook_size)
            p = counts[counts > 0] / max(len(codes), 1)
            usage.append(float((counts > 0).mean()))
            perplexity.append(float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0)
        _, inverse, tuple_counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        shared = tuple_counts[inverse.reshape(-1)] > 1
        return RQStats(per_level[-1] if per_level else 1.0, per_level, usage, perplexity,
                       float(shared.mean()) if len(codes) else 0.0, int(len(tuple_counts)))


def offset_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Per-level codes → level-offset gen ids: level l uses ids [l·K, (l+1)·K)."""
    return codes + np.arange(codes.shape[1], dtype=np.int64)[None, :] * codebook_size
