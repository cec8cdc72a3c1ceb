"""HybridTokenizer: item text → gen-tokens (RQ-Kmeans codes) + mem-tokens (BPE pieces), paper §3.

Pipeline: frozen MiniLM text embedding → collaborative projection (alignment.py) → residual
k-means (rq_kmeans.py) → BPE over the gen sequence (bpe.py). `fit` learns the last three from
items and interactions; `encode_*` only applies them, so an item published after the fit gets
tokens from the frozen artifact.

`save` / `load` write and read the artifact, a directory sealed by a sha256 manifest whose
`version` hashes the files that determine encoding; the format lives in tokenizer/artifact.py.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tokenizer import artifact
from tokenizer.artifact import CONFIG_FILE
from tokenizer.encoder import EMBED_DIM, MODEL_NAME, ContentEncoder
from tokenizer.errors import ArtifactError, TokenizerError  # noqa: F401  (re-exported: callers catch them here)
from tokenizer.manifest import sha256_bytes

# Fields that only change speed, not tokens: ignored when comparing an artifact with an expected config.
RUNTIME_FIELDS = frozenset({"threads", "encoder_batch_size"})


@dataclass
class TokenizerConfig:
    levels: int = 3  # L: gen-tokens per item
    codebook_size: int = 256  # K: codes per level (see rq_kmeans.py for the sizing)
    mem_vocab_size: int = 8192  # BPE budget, base alphabet (L·K) included
    bpe_min_frequency: int = 2  # a merge needs this much (interaction-weighted) support
    kmeans_niter: int = 25
    rq_assign: str = "cosine"  # "cosine": code by residual direction (balanced levels); "l2": plain RQ-Kmeans
    # coarse tokens: the item's `coarse_k` nearest level-1 codes, nearest first (the first is its gen
    # token): a soft membership of the coarse categories, as a film has several genres (at most K).
    # 6 = the first code and the 5 next the ranker's online keys read (trainer/models/config.py coarse_keys)
    coarse_k: int = 6
    seed: int = 0
    threads: int | None = None  # torch + faiss threads; None leaves the libraries' default
    encoder_batch_size: int = 64
    # collaborative alignment (§3.1, scaled down)
    align: bool = True
    align_window: int = 5  # pair a positive with the next `window` positives of the same user
    align_min_count: int = 2  # ...if at least this many such co-likes exist
    align_max_pairs: int = 200_000
    align_holdout: float = 0.1  # share of pairs held out to measure recall
    align_hidden: int = 512
    align_epochs: int = 5
    align_batch_size: int = 512
    align_lr: float = 1e-3
    align_tau: float = 0.07
    align_content_weight: float = 0.1  # pull towards the raw embedding: keeps content semantics
    align_random_negatives: int = 512  # catalogue-wide negatives per batch, besides in-batch ones
    recall_k: int = 10

    def validate(self) -> None:
        if self.levels < 1 or self.codebook_size < 2:
            raise TokenizerError(f"levels ({self.levels}) must be ≥1 and codebook_size ({self.codebook_size}) ≥2")
        if self.mem_vocab_size < self.levels * self.codebook_size:
            raise TokenizerError(f"mem_vocab_size={self.mem_vocab_size} < levels·codebook_size="
                                 f"{self.levels * self.codebook_size}: the BPE alphabet alone needs that many ids")
        if self.rq_assign not in ("cosine", "l2"):
            raise TokenizerError(f"rq_assign must be 'cosine' or 'l2', got {self.rq_assign!r}")
        if self.coarse_k < 1:
            raise TokenizerError(f"coarse_k must be >= 1 (1: the first gen token only), got {self.coarse_k}")
        if not 0.0 <= self.align_holdout < 1.0:
            raise TokenizerError(f"align_holdout must be in [0, 1), got {self.align_holdout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ArtifactError(f"{CONFIG_FILE} has unknown fields {unknown}: written by a newer tokenizer?")
        return cls(**d)


@dataclass
class ItemTokens:
    gen_tokens: list[int]  # L ints, level-offset: level l uses ids [l·K, (l+1)·K)
    mem_tokens: list[int]  # BPE pieces covering the gen sequence, ids in [0, mem_vocab_size)
    tokenizer_version: str
    coarse_tokens: list[int] = dataclasses.field(default_factory=list)  # coarse_k level-1 codes, nearest first


def sorted_catalogue(items: list, error: type[TokenizerError] = TokenizerError) -> tuple[list, list[int], list[int]]:
    """(items sorted by item_id, the order taken from the input, their ids); a duplicate id raises `error`.
    Sorted so a fit (or refit) does not depend on the order the catalogue came in."""
    order = sorted(range(len(items)), key=lambda i: items[i].item_id)
    items = [items[i] for i in order]
    ids = [it.item_id for it in items]
    if len(set(ids)) != len(ids):
        raise error("duplicate item_id in items")
    return items, order, ids


def precomputed_embeddings(embeddings: np.ndarray, order: list[int],
                           error: type[TokenizerError] = TokenizerError) -> np.ndarray:
    """Raw encoder rows given in the caller's item order -> float32 rows in `sorted_catalogue` order."""
    if embeddings.shape != (len(order), EMBED_DIM):
        raise error(f"embeddings must be [{len(order)}, {EMBED_DIM}], got {embeddings.shape}")
    return np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32)[order])


def bpe_weights(ids: list[int], interactions: list) -> list[int]:
    """1 + each item's interactions: BPE merges follow what users touch (bpe.py)."""
    n = {i: 0 for i in ids}
    for it in interactions:
        if it.item_id in n:
            n[it.item_id] += 1
    return [1 + n[i] for i in ids]


def _set_threads(threads: int | None) -> None:
    if threads:
        import faiss
        import torch

        torch.set_num_threads(int(threads))
        faiss.omp_set_num_threads(int(threads))


class HybridTokenizer:
    """Fitted tokenizer; build with `fit` or `load`, never by hand."""

    def __init__(self, config: TokenizerConfig, projector, quantizer, bpe, encoder_sha256: str,
                 fit_report: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None) -> None:
        self.config = config
        self.lineage = lineage  # a refit's map from its parent's ids (tokenizer/refit.py); None for a fresh fit
        self.projector = projector
        self.quantizer = quantizer
        self.bpe = bpe
        self.encoder_sha256 = encoder_sha256
        self.fit_report: dict[str, Any] = fit_report or {}
        self._encoder: ContentEncoder | None = None
        self._files = artifact.serialize(self)  # the artifact's bytes: the version is a hash over them
        self._hashes = {name: sha256_bytes(data) for name, data in self._files.items()}
        self.version = artifact.version_of(self._hashes)

    # --- sizes (contracts.md) ---
    @property
    def num_levels(self) -> int:
        return self.config.levels

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def gen_vocab_size(self) -> int:
        return self.config.levels * self.config.codebook_size

    @property
    def mem_vocab_size(self) -> int:
        return self.config.mem_vocab_size

    @property
    def encoder(self) -> ContentEncoder:
        if self._encoder is None:
            self._encoder = ContentEncoder(batch_size=self.config.encoder_batch_size, threads=self.config.threads)
        return self._encoder

    # --- fit ---
    @classmethod
    def fit(cls, items: Iterable | dict, interactions: Iterable, config: TokenizerConfig | None = None,
            progress: bool = True, *, embeddings: np.ndarray | None = None,
            encoder: ContentEncoder | None = None, fit_cutoff: int | None = None) -> "HybridTokenizer":
        """Learn projection, codebooks and merges from items (list[Item]) and their interactions.

        `embeddings` (raw encoder output, rows in the order of `items`) skips the encoder pass —
        tests and benchmarks reuse one; `encoder` reuses a loaded model. `fit_cutoff` (epoch s), when
        the data was cut on the timeline, is recorded in `fit_report["fit_cutoff"]` so evaluation can
        tell items the fit saw from items created after it.
        """
        from tokenizer import alignment
        from tokenizer.bpe import GenBPE
        from tokenizer.rq_kmeans import ResidualKMeans, offset_codes

        config = config or TokenizerConfig()
        config.validate()
        _set_threads(config.threads)
        items = list(items.values()) if isinstance(items, dict) else list(items)
        if not items:
            raise TokenizerError("no items to fit on: pass the catalogue (list[Item]) known before the cutoff")
        if len(items) < config.codebook_size:
            raise TokenizerError(f"{len(items)} items cannot fill a codebook of {config.codebook_size}; "
                                 f"lower codebook_size (e.g. --codebook {max(2, len(items) // 40)})")
        interactions = list(interactions)
        items, order, ids = sorted_catalogue(items)
        t_start = time.perf_counter()
        report: dict[str, Any] = {"n_items": len(items), "n_interactions": len(interactions),
                                  "n_positives": sum(1 for i in interactions if i.label == 1),
                                  "fit_cutoff": None if fit_cutoff is None else int(fit_cutoff),
                                  "data_end": max((i.event_time for i in interactions), default=None)}
        timings: dict[str, float] = {}

        encoder = encoder or ContentEncoder(batch_size=config.encoder_batch_size, threads=config.threads)
        t = time.perf_counter()
        if embeddings is None:
            raw = encoder.encode([it.text() for it in items], progress=progress)
            timings["encode"] = time.perf_counter() - t
            report["encoder"] = {"model": MODEL_NAME, "items_per_s": len(items) / max(timings["encode"], 1e-9)}
        else:
            raw = precomputed_embeddings(embeddings, order)
            report["encoder"] = {"model": MODEL_NAME, "items_per_s": None, "precomputed": True}

        # collaborative alignment
        t = time.perf_counter()
        rows = alignment.item_rows(ids)
        align_rep: dict[str, Any] = {"enabled": config.align}
        projector = alignment.new_projector(EMBED_DIM, config.align_hidden, config.seed)  # identity at init
        if config.align:
            pairs = alignment.mine_pairs(interactions, rows, config.align_window, config.align_min_count,
                                         config.align_max_pairs)
            train, held = alignment.split_pairs(pairs, config.align_holdout, config.seed)
            align_rep.update(pairs=len(pairs), train_pairs=len(train), heldout_pairs=len(held))
            if len(train) >= 2:
                res = alignment.train_projector(raw, train, hidden=config.align_hidden, epochs=config.align_epochs,
                                                batch_size=config.align_batch_size, lr=config.align_lr,
                                                tau=config.align_tau, content_weight=config.align_content_weight,
                                                random_negatives=config.align_random_negatives,
                                                seed=config.seed, progress=progress)
                projector = res.projector
                align_rep["loss_per_epoch"] = res.losses
            else:
                align_rep["skipped"] = "fewer than 2 co-liked pairs: projection left at identity"
            aligned = projector.project(raw)
            k = config.recall_k
            if len(held):
                align_rep[f"recall@{k}_before"] = alignment.recall_at_k(raw, held, k)
                align_rep[f"recall@{k}_after"] = alignment.recall_at_k(aligned, held, k)
        else:
            aligned = projector.project(raw)
        timings["align"] = time.perf_counter() - t
        report["alignment"] = align_rep

        # gen-tokens
        t = time.perf_counter()
        quantizer, codes = ResidualKMeans.fit(aligned, config.levels, config.codebook_size,
                                              niter=config.kmeans_niter, seed=config.seed,
                                              assign=config.rq_assign, progress=progress)
        timings["rq_fit"] = time.perf_counter() - t
        report["rq"] = quantizer.stats(aligned, codes).as_dict()
        gen = offset_codes(codes, config.codebook_size)

        # mem-tokens, weighted by interaction frequency
        t = time.perf_counter()
        weights = bpe_weights(ids, interactions)
        gen_lists = [list(map(int, g)) for g in gen]
        bpe = GenBPE.learn(gen_lists, weights, config.levels * config.codebook_size, config.mem_vocab_size,
                           config.bpe_min_frequency)
        timings["bpe_learn"] = time.perf_counter() - t
        mem = bpe.encode(gen_lists)
        n_pieces = np.array([len(m) for m in mem], dtype=np.float64)
        w = np.array(weights, dtype=np.float64)
        report["bpe"] = {"vocab_used": bpe.vocab_used, "merges": bpe.num_merges,
                         "mean_pieces_per_item": float(n_pieces.mean()),
                         "single_piece_items": float((n_pieces == 1).mean()),
                         "single_piece_interaction_share": float((w * (n_pieces == 1)).sum() / w.sum())}
        timings["total"] = time.perf_counter() - t_start
        report["timings_s"] = timings
        report["config"] = config.to_dict()
        tok = cls(config, projector, quantizer, bpe, encoder.checksum(), report)
        tok._encoder = encoder
        return tok

    # --- encode ---
    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Aligned embeddings (float32 [N, 384], unit rows): what the codebooks quantise."""
        return self.projector.project(self.encoder.encode(list(texts), progress=progress))

    def encode_embeddings(self, raw: np.ndarray) -> list[ItemTokens]:
        """Tokens from raw encoder embeddings (skips the text encoder)."""
        from tokenizer.rq_kmeans import offset_codes

        aligned = self.projector.project(np.asarray(raw, dtype=np.float32))
        gen = offset_codes(self.quantizer.encode(aligned), self.codebook_size)
        coarse = self.quantizer.nearest_codes(aligned, min(self.config.coarse_k, self.codebook_size))  # (N, C)
        gen_lists = [list(map(int, g)) for g in gen]
        mem = self.bpe.encode(gen_lists)
        return [ItemTokens(g, list(map(int, m)), self.version, list(map(int, c)))
                for g, m, c in zip(gen_lists, mem, coarse)]

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> list[ItemTokens]:
        _set_threads(self.config.threads)
        return self.encode_embeddings(self.encoder.encode(list(texts), progress=progress))

    def encode_items(self, items: Iterable, progress: bool = False) -> list[ItemTokens]:
        """Same as encode_texts on Item.text(), in the order given."""
        return self.encode_texts([it.text() for it in items], progress=progress)

    # --- artifact (tokenizer/artifact.py) ---
    def save(self, directory: str | Path) -> Path:
        """Write the artifact; manifest.json last, so a half-written directory never verifies."""
        return artifact.save(self, directory)

    @classmethod
    def load(cls, directory: str | Path, expect_config: TokenizerConfig | None = None,
             verify_encoder: bool = True) -> "HybridTokenizer":
        """Read and verify an artifact. Raises ArtifactError naming the offending file or field.

        `expect_config`: the config the caller was built for; any difference other than runtime
        knobs (threads, batch size) raises. `verify_encoder`: compare the installed encoder weights'
        sha256 with the one recorded at fit time.
        """
        return artifact.load(directory, expect_config, verify_encoder, cls=cls)

    @classmethod
    def refit(cls, old: "HybridTokenizer", items: Iterable | dict, interactions: Iterable,
              **kwargs) -> "HybridTokenizer":
        """Fit on recent data warm-started from `old`, ids matched to its ids (tokenizer/refit.py)."""
        from tokenizer.refit import refit

        return refit(old, items, interactions, **kwargs)
