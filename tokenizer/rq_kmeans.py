"""Gen-tokens by residual k-means (RQ-Kmeans, paper §3.2): L levels × K codes, fitted with faiss.

Level l clusters the residuals left by levels < l, so the first code is a coarse semantic group
(shared by many items → generalisation) and later codes refine it. Encoding is nearest centroid
per level on the same residual chain; it never refits, so a new item gets codes from the frozen
codebooks.

Assignment (`assign="cosine"`, the default) is nearest centroid on the residual's *direction*:
each level keeps unit "direction" centroids (spherical k-means, faiss) for choosing the code and
the mean residual of each code for the reconstruction. Plain L2 k-means (`assign="l2"`) degenerates
on deep levels: residuals there are near-isotropic noise, a few centroids near the origin win almost
every point (MovieLens subset, K=32: level-3 perplexity 18 of 32, 28% tuple collisions), while
direction assignment spreads them evenly (31.5 of 32, 11%) at equal or lower reconstruction error.

Defaults for ~10k items (MovieLens small): L=3, K=256. K=256 leaves ~38 items per first-level
code — faiss's rule of thumb is ≥39 points per centroid — so codes are well populated and
shared; 256³ ≈ 16.7M tuples ≫ 10k items keeps full-tuple collisions rare. The paper's 5×4096 is
sized for billions of items.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenizer.errors import TokenizerError

ASSIGN_MODES = ("cosine", "l2")


class QuantizerError(TokenizerError):
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
    """Codebooks float32 [L, K, d] (reconstruction) and directions [L, K, d] (assignment).

    `codes` are per-level indices in [0, K) (not level-offset). With assign="l2" the directions
    are the codebooks and residuals are not normalised.
    """

    def __init__(self, codebooks: np.ndarray, directions: np.ndarray | None = None, assign: str = "cosine") -> None:
        if codebooks.ndim != 3:
            raise QuantizerError(f"codebooks must be [levels, K, dim], got shape {codebooks.shape}")
        if assign not in ASSIGN_MODES:
            raise QuantizerError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
        dirs = self.codebooks if directions is None else directions
        if dirs.shape != self.codebooks.shape:
            raise QuantizerError(f"directions {dirs.shape} and codebooks {self.codebooks.shape} differ in shape")
        self.directions = np.ascontiguousarray(dirs, dtype=np.float32)
        self.assign = assign
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

    @staticmethod
    def _query(residual: np.ndarray, assign: str) -> np.ndarray:
        if assign == "l2":
            return residual
        norm = np.linalg.norm(residual, axis=1, keepdims=True)
        return np.ascontiguousarray(residual / np.maximum(norm, 1e-12), dtype=np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, levels: int, codebook_size: int, niter: int = 25, seed: int = 0,
            assign: str = "cosine", progress: bool = False,
            init: np.ndarray | None = None) -> tuple["ResidualKMeans", np.ndarray]:
        """Fit L codebooks on x [N, d]; returns (quantizer, fit-time codes [N, L]).

        `init` (directions [L, K, d] of an earlier fit) starts each level's k-means from those
        centroids instead of a random draw: a refit (tokenizer/refit.py) then lands near the old
        clusters wherever the data still supports them."""
        import faiss

        if assign not in ASSIGN_MODES:
            raise QuantizerError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise QuantizerError(f"expected a 2-d array of embeddings, got shape {x.shape}")
        n, d = x.shape
        if init is not None and tuple(init.shape) != (levels, codebook_size, d):
            raise QuantizerError(f"init centroids have shape {tuple(init.shape)}, this fit needs "
                                 f"{(levels, codebook_size, d)} (levels, K, dim)")
        if n < codebook_size:
            raise QuantizerError(f"{n} items cannot fill a codebook of {codebook_size} codes: "
                                 f"lower codebook_size to at most {n}")
        residual = x.copy()
        books = np.zeros((levels, codebook_size, d), dtype=np.float32)
        dirs = np.zeros((levels, codebook_size, d), dtype=np.float32)
        codes = np.zeros((n, levels), dtype=np.int64)
        rng = range(levels)
        if progress:
            from tqdm import tqdm

            rng = tqdm(rng, desc="rq-kmeans", unit="level", leave=False)
        for lvl in rng:
            q = cls._query(residual, assign)
            km = faiss.Kmeans(d, codebook_size, niter=niter, seed=seed + lvl, verbose=False,
                              spherical=(assign == "cosine"), max_points_per_centroid=1_000_000,
                              min_points_per_centroid=1)  # ~38/code is by design (see above)
            km.train(q, init_centroids=None if init is None else np.ascontiguousarray(init[lvl], dtype=np.float32))
            dirs[lvl] = km.centroids
            index = faiss.IndexFlatL2(d)  # on unit vectors, nearest in L2 = highest cosine
            index.add(dirs[lvl])
            _, assign_idx = index.search(q, 1)
            codes[:, lvl] = assign_idx[:, 0]
            if assign == "l2":
                books[lvl] = dirs[lvl]
            else:  # the reconstruction of a code is the mean residual of its members
                counts = np.bincount(codes[:, lvl], minlength=codebook_size)
                sums = np.zeros((codebook_size, d), dtype=np.float64)
                np.add.at(sums, codes[:, lvl], residual)
                books[lvl] = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
            residual -= books[lvl][codes[:, lvl]]
        return cls(books, dirs, assign), codes

    def _level_indexes(self):
        if self._indexes is None:
            import faiss

            self._indexes = []
            for lvl in range(self.levels):
                index = faiss.IndexFlatL2(self.dim)
                index.add(self.directions[lvl])
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
            _, assign = index.search(self._query(residual, self.assign), 1)
            codes[:, lvl] = assign[:, 0]
            residual -= self.codebooks[lvl][codes[:, lvl]]
        return codes

    def nearest_codes(self, x: np.ndarray, k: int) -> np.ndarray:
        """The k nearest level-1 codes of each point, nearest first: int64 [N, k] (the first is its code).

        Level 1 quantises the point itself, so its runners-up are the other coarse categories the item
        is close to; deeper levels' neighbours would depend on the first choice."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise QuantizerError(f"expected embeddings of shape [N, {self.dim}], got {x.shape}")
        if len(x) == 0:
            return np.zeros((0, k), dtype=np.int64)
        _, idx = self._level_indexes()[0].search(self._query(x, self.assign), int(k))
        return idx.astype(np.int64)

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


def permute_levels(quantizer: ResidualKMeans, perm: np.ndarray) -> ResidualKMeans:
    """The same quantizer with level l's code c renamed perm[l, c] (perm [L, K], a permutation per level).

    Renaming codes changes no reconstruction and no residual: only which id a centroid answers to."""
    perm = np.asarray(perm, dtype=np.int64)
    L, K = quantizer.levels, quantizer.codebook_size
    if perm.shape != (L, K) or any(sorted(row) != list(range(K)) for row in perm.tolist()):
        raise QuantizerError(f"perm must hold one permutation of range({K}) per level, shape ({L}, {K})")
    books, dirs = np.empty_like(quantizer.codebooks), np.empty_like(quantizer.directions)
    for lvl in range(L):
        books[lvl, perm[lvl]] = quantizer.codebooks[lvl]
        dirs[lvl, perm[lvl]] = quantizer.directions[lvl]
    return ResidualKMeans(books, dirs, quantizer.assign)
