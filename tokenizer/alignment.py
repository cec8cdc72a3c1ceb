"""Collaborative alignment (paper §3.1, scaled down): pull co-liked items together.

The paper fine-tunes an MLLM with in-batch InfoNCE on query–item and frequently co-clicked
item–item pairs. Here the text encoder stays frozen and a small residual MLP on top of it is
trained on co-liked item pairs mined from the interaction log. The residual branch starts at zero
(the projection is the identity at init) and a small content-preservation term keeps aligned
vectors near the original ones, so near-duplicate texts still map together while co-liked items
move closer.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class PairSet:
    """Co-liked item pairs as row indices into the embedding matrix, with their co-like counts."""

    a: np.ndarray  # int64 [P]
    b: np.ndarray  # int64 [P]
    count: np.ndarray  # int64 [P]

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def subset(self, idx: np.ndarray) -> "PairSet":
        return PairSet(self.a[idx], self.b[idx], self.count[idx])


def mine_pairs(interactions: Iterable, row_of: dict[int, int], window: int = 5,
               min_count: int = 2, max_pairs: int = 200_000) -> PairSet:
    """Item pairs liked (label 1) by one user within `window` consecutive positives of each other.

    Consecutive positives in one user's timeline are a cheap stand-in for the paper's co-clicks; a
    pair must recur across users (`min_count`) so one idiosyncratic session does not count. The
    highest-count pairs are kept (ties broken by item ids, so the result is deterministic).
    """
    per_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for it in interactions:
        if it.label == 1 and it.item_id in row_of:
            per_user[it.user_id].append((it.event_time, row_of[it.item_id]))
    counts: Counter[tuple[int, int]] = Counter()
    for seq in per_user.values():
        seq.sort()
        rows = [r for _, r in seq]
        for i, ri in enumerate(rows):
            for rj in rows[i + 1:i + 1 + window]:
                if ri != rj:
                    counts[(ri, rj) if ri < rj else (rj, ri)] += 1
    kept = sorted(((c, p) for p, c in counts.items() if c >= min_count), key=lambda x: (-x[0], x[1]))
    kept = kept[:max_pairs]
    if not kept:
        return PairSet(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    a = np.array([p[0] for _, p in kept], dtype=np.int64)
    b = np.array([p[1] for _, p in kept], dtype=np.int64)
    c = np.array([c for c, _ in kept], dtype=np.int64)
    return PairSet(a, b, c)


def split_pairs(pairs: PairSet, holdout: float, seed: int) -> tuple[PairSet, PairSet]:
    """Random (train, held-out) split of the pairs."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(pairs))
    n_hold = int(round(holdout * len(pairs)))
    return pairs.subset(np.sort(perm[n_hold:])), pairs.subset(np.sort(perm[:n_hold]))


def recall_at_k(emb: np.ndarray, pairs: PairSet, k: int = 10) -> float:
    """Share of held-out pairs (both directions) whose partner is in the query's top-k by cosine.

    The query item itself is excluded from its own results; every item is a candidate.
    """
    import faiss

    if len(pairs) == 0:
        return float("nan")
    x = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    queries = np.concatenate([pairs.a, pairs.b])
    targets = np.concatenate([pairs.b, pairs.a])
    uq, inv = np.unique(queries, return_inverse=True)
    _, nn_idx = index.search(x[uq], k + 1)
    hits = 0
    for qi, tgt in zip(inv, targets):
        row = nn_idx[qi]
        row = row[row != uq[qi]][:k]
        hits += int(tgt in row)
    return hits / len(queries)


class ResidualProjector(nn.Module):
    """x ↦ normalize(x + W2·gelu(W1·x)); W2 starts at zero, so the projection is the identity at init."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.down(F.gelu(self.up(x))), dim=-1)

    @property
    def dim(self) -> int:
        return self.up.in_features

    @property
    def hidden(self) -> int:
        return self.up.out_features

    def project(self, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        """Numpy in, numpy out (float32, unit rows); no gradients."""
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                out.append(self(torch.from_numpy(np.array(x[s:s + batch], dtype=np.float32))).numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def new_projector(dim: int, hidden: int, seed: int) -> ResidualProjector:
    """An identity-at-init projector whose (unused until trained) first layer is seeded: the artifact
    bytes, and so the tokenizer version, must not depend on the caller's global torch RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = ResidualProjector(dim, hidden)
    proj.eval()
    return proj


@dataclass
class AlignResult:
    projector: ResidualProjector
    losses: list[float]  # mean loss per epoch


def _false_negatives(ia: torch.Tensor, ib: torch.Tensor, pos_keys: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B, B] mask of off-diagonal in-batch "negatives" that are really positives.

    Popular items sit in many pairs, so a batch often holds (x, y) and (x, z): without the mask,
    z would be pushed away from x although they are co-liked too. Masked: the same item as the
    target, or any known co-liked pair. The mask is symmetric in meaning, so its transpose serves
    the b→a direction.
    """
    lo = torch.minimum(ia[:, None], ib[None, :])
    hi = torch.maximum(ia[:, None], ib[None, :])
    known = torch.isin(lo * n_items + hi, pos_keys)
    same = (ia[:, None] == ib[None, :]) | (ib[:, None] == ib[None, :]) | (ia[:, None] == ia[None, :])
    mask = known | same
    mask.fill_diagonal_(False)
    return mask


def train_projector(emb: np.ndarray, pairs: PairSet, hidden: int = 512, epochs: int = 5,
                    batch_size: int = 512, lr: float = 1e-3, tau: float = 0.07,
                    content_weight: float = 0.1, random_negatives: int = 512, seed: int = 0,
                    progress: bool = False) -> AlignResult:
    """Train the residual projector with symmetric in-batch InfoNCE over (a, b) pairs.

    Loss = ½(CE(sim(a,b)/τ) + CE(sim(b,a)/τ)) + content_weight·mean(1 − cos(h, x)). Candidates are
    the batch's partners (known co-liked ones masked) plus `random_negatives` items drawn from the
    whole catalogue: without them the projection never learns to push the long tail away, and
    retrieval among all items barely improves. Seeded, so a fit is reproducible on the same machine
    and thread count.
    """
    gen = torch.Generator().manual_seed(seed)
    proj = new_projector(emb.shape[1], hidden, seed)
    x = torch.from_numpy(np.array(emb, dtype=np.float32))  # a copy: emb may be read-only
    a = torch.from_numpy(pairs.a)
    b = torch.from_numpy(pairs.b)
    n_items = int(x.shape[0])
    n_random = int(random_negatives)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    pos_keys = torch.unique(lo * n_items + hi)  # sorted: every known co-liked pair
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc="align", unit="epoch", leave=False)
    proj.train()
    for _ in range(epochs):
        perm = torch.randperm(len(a), generator=gen)
        total, n = 0.0, 0
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            if len(idx) < 2:
                continue
            xa, xb = x[a[idx]], x[b[idx]]
            ha, hb = proj(xa), proj(xb)
            ia, ib = a[idx], b[idx]
            fn = _false_negatives(ia, ib, pos_keys, n_items)
            target = torch.arange(len(idx))
            logits = (ha @ hb.T / tau).masked_fill(fn, -1e4)
            logits_t = (hb @ ha.T / tau).masked_fill(fn.T, -1e4)
            if n_random:
                # catalogue negatives: retrieval competes with every item, not only the
                # (mostly popular) items that appear in pairs
                neg = torch.randint(0, n_items, (n_random,), generator=gen)
                hn = proj(x[neg])
                logits = torch.cat([logits, (ha @ hn.T / tau).masked_fill(neg[None, :] == ib[:, None], -1e4)], 1)
                logits_t = torch.cat([logits_t, (hb @ hn.T / tau).masked_fill(neg[None, :] == ia[:, None], -1e4)], 1)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits_t, target))
            keep = 2.0 - (ha * xa).sum(-1).mean() - (hb * xb).sum(-1).mean()
            loss = loss + content_weight * keep / 2.0
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        losses.append(total / max(n, 1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    proj.eval()
    return AlignResult(proj, losses)


def projector_state(proj: ResidualProjector) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in proj.state_dict().items()}


def projector_from_state(state: dict[str, torch.Tensor]) -> ResidualProjector:
    hidden, dim = state["up.weight"].shape
    proj = ResidualProjector(int(dim), int(hidden))
    proj.load_state_dict(state)
    proj.eval()
    return proj


def item_rows(item_ids: Sequence[int]) -> dict[int, int]:
    return {int(i): r for r, i in enumerate(item_ids)}
