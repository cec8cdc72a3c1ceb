"""Refit a tokenizer on recent data so that an id keeps its meaning wherever its cluster persists.

A fresh fit names its k-means clusters in arbitrary order: code 17 of the old artifact and code 17
of a new one are unrelated, so every downstream table keyed by tokens (the ranker's embedding rows,
the per-user keys, the tokens stored in user histories) would start over. `refit`:

  1. keeps the old collaborative projection (the codebooks live in its space; re-aligning would
     move every item at once) and embeds the catalogue known at the refit;
  2. fits each RQ level warm-started from the old level's centroids (faiss k-means `init_centroids`);
  3. matches the new centroids of each level to the old ids by an optimal assignment on cosine
     similarity (scipy's `linear_sum_assignment`, the Hungarian method), and renames them so;
  4. relearns the BPE merges on the new codes and renumbers them: a piece the old BPE also has
     keeps its old mem id, a new piece takes an id the old one never used (tokenizer/bpe.py);
  5. records the lineage (tokenizer/artifact.py's lineage.json): the parent version, per level and
     new id the similarity to the old centroid of the same id and the nearest old id, and for every
     mem id whose piece is new the old mem id to start it from (its longest prefix the old BPE had).
     A ranker checkpoint crosses the refresh with that map (trainer/migrate.py).

The fit report holds, per level, the share of items whose code changed, usage, perplexity and the
collision rate, beside the same figures for a refit from scratch (random init, no matching) and for
scratch + matching, on the same items: what the warm start and the matching are each worth.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable

import numpy as np

from tokenizer.errors import TokenizerError

LINEAGE_FORMAT = 1


class RefitError(TokenizerError):
    """A refit that cannot keep the old artifact's meaning (another geometry, no items)."""


def match_levels(old_dirs: np.ndarray, new_dirs: np.ndarray) -> np.ndarray:
    """perm [L, K]: new centroid c of level l is renamed perm[l, c], maximising the total cosine
    similarity to the old centroid of the same id (one optimal assignment per level)."""
    from scipy.optimize import linear_sum_assignment

    L, K, _ = old_dirs.shape
    perm = np.zeros((L, K), dtype=np.int64)
    for lvl in range(L):
        sim = _unit(new_dirs[lvl]) @ _unit(old_dirs[lvl]).T  # (K new, K old)
        rows, cols = linear_sum_assignment(-sim)
        perm[lvl, rows] = cols
    return perm


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gen_lineage(old_dirs: np.ndarray, new_dirs: np.ndarray) -> dict[str, list]:
    """Per level and (renamed) new id: cosine to the old centroid with the same id, and the old id
    of the nearest old centroid (where a new code's embedding starts when its id lost its cluster)."""
    sim_same, nearest, sim_nearest = [], [], []
    for lvl in range(old_dirs.shape[0]):
        sim = _unit(new_dirs[lvl]) @ _unit(old_dirs[lvl]).T  # (K new, K old)
        sim_same.append([round(float(v), 6) for v in np.diag(sim)])
        nearest.append([int(v) for v in sim.argmax(1)])
        sim_nearest.append([round(float(v), 6) for v in sim.max(1)])
    return {"similarity_same_id": sim_same, "nearest_old": nearest, "similarity_nearest": sim_nearest}


def mem_lineage(old_bpe, new_bpe, gen_nearest: list[list[int]], codebook_size: int) -> dict[str, int]:
    """{new mem id: old mem id to start its embedding from}, for every id whose meaning is not kept.

    A base symbol (mem id = gen id) follows its gen code's nearest old code; a merged piece the old
    BPE had under the same id keeps it (no entry); a new piece starts from its longest prefix the
    old BPE had (at worst its first symbol's, which always exists)."""
    old_ids = {tuple(p): i for i, p in old_bpe.pieces().items()}
    out: dict[str, int] = {}
    for i, piece in sorted(new_bpe.pieces().items()):
        if len(piece) == 1:
            g = piece[0]
            src = gen_nearest[g // codebook_size][g % codebook_size] + (g // codebook_size) * codebook_size
            if src != i:
                out[str(i)] = int(src)
            continue
        if old_ids.get(tuple(piece)) == i:
            continue
        for n in range(len(piece) - 1, 0, -1):
            if tuple(piece[:n]) in old_ids:
                out[str(i)] = int(old_ids[tuple(piece[:n])])
                break
    return out


def _figures(quantizer, aligned: np.ndarray, codes: np.ndarray, old_codes: np.ndarray, seconds: float) -> dict:
    d = quantizer.stats(aligned, codes).as_dict()
    d["code_changed"] = [float((codes[:, lvl] != old_codes[:, lvl]).mean()) for lvl in range(codes.shape[1])]
    d["tuple_changed"] = float((codes != old_codes).any(1).mean())
    d["seconds"] = seconds
    return d


def refit(old, items: Iterable | dict, interactions: Iterable, *, progress: bool = True,
          embeddings: np.ndarray | None = None, encoder=None, fit_cutoff: int | None = None,
          compare_scratch: bool = True):
    """A HybridTokenizer fitted on `items` / `interactions`, warm-started from and matched to `old`.

    Same geometry, projection and encoder as `old`; `embeddings` (raw encoder rows in the order of
    `items`) skips the encoder pass, as in HybridTokenizer.fit."""
    from tokenizer.bpe import GenBPE
    from tokenizer.encoder import ContentEncoder
    from tokenizer.hybrid import HybridTokenizer, bpe_weights, precomputed_embeddings, sorted_catalogue
    from tokenizer.rq_kmeans import ResidualKMeans, offset_codes, permute_levels

    config = copy.deepcopy(old.config)
    encoder = encoder or ContentEncoder(batch_size=config.encoder_batch_size, threads=config.threads)
    if encoder.checksum() != old.encoder_sha256:
        raise RefitError(f"{old.version} was fitted with other encoder weights (sha256 {old.encoder_sha256[:12]}…, "
                         f"installed {encoder.checksum()[:12]}…): its codebooks live in that encoder's space, so "
                         "no refit can keep their meaning; fit a new tokenizer (`trm tokenizer fit`) and start "
                         "the ranker over, or reinstall the encoder it was fitted with")
    items = list(items.values()) if isinstance(items, dict) else list(items)
    if len(items) < config.codebook_size:
        raise RefitError(f"{len(items)} items cannot fill the old artifact's codebook of {config.codebook_size}; "
                         f"a refit keeps the geometry: fit a new tokenizer (`trm tokenizer fit --codebook ...`)")
    interactions = list(interactions)
    items, order, ids = sorted_catalogue(items, RefitError)
    t_start = time.perf_counter()
    if embeddings is None:
        raw = encoder.encode([it.text() for it in items], progress=progress)
    else:
        raw = precomputed_embeddings(embeddings, order, RefitError)
    aligned = old.projector.project(raw)
    old_codes = old.quantizer.encode(aligned)  # what the old artifact says about the same items
    L, K = config.levels, config.codebook_size
    fit = dict(levels=L, codebook_size=K, niter=config.kmeans_niter, seed=config.seed, assign=config.rq_assign)

    t = time.perf_counter()
    warm, codes = ResidualKMeans.fit(aligned, init=old.quantizer.directions, progress=progress, **fit)
    perm = match_levels(old.quantizer.directions, warm.directions)
    quantizer, codes = permute_levels(warm, perm), _rename(perm, codes)
    rq_s = time.perf_counter() - t
    report: dict[str, Any] = {"n_items": len(items), "n_interactions": len(interactions),
                              "fit_cutoff": None if fit_cutoff is None else int(fit_cutoff),
                              "data_end": max((i.event_time for i in interactions), default=None),
                              "refit_from": old.version,
                              "refit": _figures(quantizer, aligned, codes, old_codes, rq_s)}
    if compare_scratch:
        t = time.perf_counter()
        scratch, s_codes = ResidualKMeans.fit(aligned, progress=progress, **fit)
        s_s = time.perf_counter() - t
        report["scratch"] = _figures(scratch, aligned, s_codes, old_codes, s_s)
        s_perm = match_levels(old.quantizer.directions, scratch.directions)
        report["scratch_matched"] = _figures(permute_levels(scratch, s_perm), aligned, _rename(s_perm, s_codes),
                                             old_codes, s_s)
    report["rq"] = {k: v for k, v in report["refit"].items() if k not in ("code_changed", "tuple_changed", "seconds")}

    t = time.perf_counter()
    gen_lists = [list(map(int, g)) for g in offset_codes(codes, K)]
    learned = GenBPE.learn(gen_lists, bpe_weights(ids, interactions), L * K, config.mem_vocab_size,
                           config.bpe_min_frequency)
    bpe = learned.renumbered(old.bpe, config.mem_vocab_size)
    old_merged = {tuple(p) for p in old.bpe.pieces().values() if len(p) > 1}
    new_merged = {tuple(p) for p in bpe.pieces().values() if len(p) > 1}
    report["bpe"] = {"vocab_used": bpe.vocab_used, "merges": bpe.num_merges,
                     "merges_kept": len(old_merged & new_merged), "merges_new": len(new_merged - old_merged),
                     "merges_retired": len(old_merged - new_merged),
                     "mean_pieces_per_item": float(np.mean([len(m) for m in bpe.encode(gen_lists)]))}
    report["timings_s"] = {"bpe_learn": time.perf_counter() - t, "total": time.perf_counter() - t_start}
    report["config"] = config.to_dict()
    gen = gen_lineage(old.quantizer.directions, quantizer.directions)
    lineage = {"format": LINEAGE_FORMAT, "parent": old.version, "levels": L, "codebook_size": K,
               "gen": gen, "mem_init": mem_lineage(old.bpe, bpe, gen["nearest_old"], K)}
    tok = HybridTokenizer(config, old.projector, quantizer, bpe, old.encoder_sha256, report, lineage=lineage)
    tok._encoder = encoder
    return tok


def _rename(perm: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """codes [N, L] under the renaming perm [L, K]."""
    return np.stack([perm[lvl][codes[:, lvl]] for lvl in range(codes.shape[1])], 1)
