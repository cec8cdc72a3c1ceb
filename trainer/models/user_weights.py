"""Per-user online weights: a correction of the ranker's logit learned from each user's own stream,
second by second (Monolith trains per-user parameters online for the same reason).

Why: the rankers learn once per chunk of 256 events, while 94 % of consecutive events share a user
and most users evaluated after the cutoff are new there. A peer that learns per event (Vowpal
Wabbit) loses 0.02 AUC when it may learn only once per 256 events, and most of that is its per-user
weights (ml-latest-small, validation window [q0.4, median): 0.7804 per event, 0.7676 per 256; with
no user namespace 0.7685). This module gives every ranker the same per-user part, learned at the
peer's pace:

    logit = (1 + s) · ranker_logit(x) + b_u + Σ_j w_uj · x_j + Σ_k (v_k + c_uk)

    x = a few request-time features (FEATURES)
    k = the item's online keys (`Ranker.online_keys`: TRM's gen-token prefixes, mem-tokens,
        next-nearest level-1 codes, lexical tokens (the words of the item's categories and
        title) and era keys (its decade and release age at the event), the ID baseline's item
        id): a global weight per key and a user × key cross, each namespace at its own rates
        (`ns_rates`), VW's `-q ug -q ut` on this system's own categories

s is one global weight on the ranker's own logit (`stack_lr`, stacking): on the validation
window the ranker's logit is over-confident for users it has not seen (it fits the warm-start rows
to 0.787 AUC and scores 0.747 on later events, where a logistic regression on the same request-time
features scores 0.764), and s learns, second by second, how far to trust it. (trm, seed 0, window
[q0.4, q0.5), AUC: without 0.7647; stack_lr 0.03 0.7670, 0.05 0.7674, 0.1 0.7679, 0.2 0.7683,
0.3 0.7684; GAUC 0.6906 -> 0.6922 at 0.1, falling above it; 0.1 kept.)

(b_u, w_u, v, c) live in one hashed table (`2**bits` slots, as VW's `-b`), learned by an adaptive
rate per slot, lr / (Σ g²)^power (power 0.5 is AdaGrad; 0.3, slower decay, as the peer's
`--power_t 0.3`), on the logistic loss of the *combined* logit; the ranker itself keeps training on its own BCE, so the
correction learns what the ranker leaves in the residual of this user's events. The inputs are
user and context features every model reads, so the model comparison still differs only in the
item side. On the validation window (trm_no_ntp, 2 seeds) it took 0.7577 to 0.7663 AUC; all 22
features per user lost 0.009 (too many weights per user). With the keys (warm start on < q0.4, then
prequential on [q0.4, q0.5), trm, seed 0): 0.7608 without keys, 0.7614 with them at AdaGrad and
the user's rate, 0.7644 with key_lr 0.05 and power 0.3 (GAUC 0.6864 -> 0.6904); RankerConfig lists
every value tried.

Ordering, the point-in-time rule: the events of one second are all scored with the weights as they
were before that second, then all of them update. An event's score never depends on its own label
nor on any event of its second. Events arrive in event-time order (trainer.kafka_source); a second
that recurs later (late data) is simply a new group.

Why the keys: the per-event peer's edge was within-user taste (GAUC 0.728 vs TRM's 0.704 on the
demo): which categories this user likes, learned from the user's own last few events. The ranker
learns categories once per chunk, globally; the crosses learn them per user, per second.

The table is a pair of buffers of the ranker that owns it (`Ranker.user_weights`), so checkpoints,
published versions and `trm eval` carry it with the weights it corrects.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..features import IDX
from .embedding import hash_ids

FEATURES = ("user_rate_logit", "item_rate_logit", "last5_rate_logit", "prefix1_rate_logit")
_MIX_U, _MIX_J = 0x9E3779B1, 0x85EBCA77  # odd multipliers of a multiplicative hash
_KEY_SALT, _CROSS_SALT = 0x2545F491, 0x6A09E667


# The online keys' namespaces (a key's low 4 bits), in one place so that no two kinds of key share one
# (a shared namespace shares its rates, `ns_rates`); all 16 are taken, so a new kind of key needs a wider
# scheme. 0 .. L-1 the gen-token prefixes (L <= 8; TRM's next-nearest level-1 codes are keyed as the
# first prefix), then:
MEM_NS = 8  # TRM's mem-tokens
ID_NS = 9  # the `id` baseline's item id
TWO_GRAM_NS, PREFIX_NGRAM_NS = 10, 15  # the n-gram baselines' wide ids
CATEGORY_NS, TITLE_NS = 11, 12  # lexical tokens (tokenizer/lexical.py): category and title words
DECADE_NS, RELEASE_AGE_NS = 13, 14  # TRM's era keys (trainer/features.era_keys)


def ns_rates(cfg) -> dict[int, tuple[float, float]]:
    """The (global, cross) rates of the key namespaces that do not use the config's default pair: the
    categories and the era keys are crossed with the user only, title words get a global weight only
    (config.category_lr, title_lr). One place, so the trainer and bench replays build the same table."""
    return {CATEGORY_NS: (0.0, cfg.category_lr), TITLE_NS: (cfg.title_lr, 0.0),
            DECADE_NS: (0.0, cfg.category_lr), RELEASE_AGE_NS: (0.0, cfg.category_lr)}


def per_second(seconds: np.ndarray) -> Iterator[slice]:
    """Slices of consecutive rows of one second, in order: the groups the online parts (this table and
    online_linear.py) score as they were before the second, then learn (the ordering rule above)."""
    bounds = [0, *(np.flatnonzero(seconds[1:] != seconds[:-1]) + 1).tolist(), len(seconds)]
    return (slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-z) overflows to inf for z < -88: sigmoid 0, as meant
        return 1 / (1 + np.exp(-z))


KEY_VALUES = 1 << 53  # a key's value is taken modulo this, so that value * 16 + namespace (and the linear
# model's tag, x 64, on top) stays within int64: the n-gram baselines' ids are 63-bit hashes, and until
# 2026-12-07 the half of them that overflowed to negative keys was read as padding


def key(value: torch.Tensor, namespace: int) -> torch.Tensor:
    """An online key of `namespace` (0-15) for non-negative int64 values (modulo KEY_VALUES, a no-op for
    the tokens' own ids); -1 (padding) stays -1."""
    return torch.where(value >= 0, torch.remainder(value, KEY_VALUES) * 16 + namespace, torch.full_like(value, -1))


class UserWeights(nn.Module):
    def __init__(self, bits: int = 18, lr: float = 0.1, g0: float = 1e-2, features: tuple[str, ...] = FEATURES,
                 key_lr: float | None = None, power: float = 0.5, stack_lr: float | None = None,
                 key_global_lr: float | None = None, ns_rates: dict[int, tuple[float, float]] | None = None):
        super().__init__()
        self.stack_lr = stack_lr
        if stack_lr is not None:  # one global weight on the ranker's own logit, and its AdaGrad sum
            self.register_buffer("stack", torch.tensor([0.0, g0]))
        self.power = power
        self.lr, self.mask, self.bits = lr, (1 << bits) - 1, bits
        self.key_lr = lr if key_lr is None else key_lr
        # per key namespace (the low 4 bits of a key): the rate of its global weight and of its user
        # × key cross; 0 leaves that part out. Namespaces not in `ns_rates` use (key_global_lr, key_lr)
        rates = torch.tensor([[self.key_lr if key_global_lr is None else key_global_lr, self.key_lr]] * 16)
        for ns, (g, c) in (ns_rates or {}).items():
            rates[ns] = torch.tensor([g, c])
        self.register_buffer("ns_rates", rates, persistent=False)  # (16, 2): global, cross
        self.register_buffer("cols", torch.tensor([IDX[f] for f in features], dtype=torch.long), persistent=False)
        self.register_buffer("w", torch.zeros(1 << bits))  # weights
        self.register_buffer("g", torch.full((1 << bits,), g0))  # AdaGrad: running sum of squared gradients

    def slots(self, users: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        # users (B,), keys (B, M) -> (B, 1+F [+2M]) table slots: bias, one per feature, then per key
        # its global slot and its user × key slot (a padding key's slots are read with input 0)
        j = torch.arange(1 + len(self.cols), device=users.device)
        s = ((users.unsqueeze(1) * _MIX_U) ^ (j * _MIX_J)) & self.mask
        if keys is None:
            return s
        size = 1 << self.bits
        glob = hash_ids(keys, size, _KEY_SALT)  # (B, M)
        cross = hash_ids(hash_ids(keys, (1 << 31) - 1, _CROSS_SALT) ^ (users.unsqueeze(1) * _MIX_U), size)
        return torch.cat([s, glob, cross], 1)

    def inputs(self, stats: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        # stats (B, N_DENSE), keys (B, M) -> (B, 1+F [+2M]): 1 (the bias), the features, then per key
        # 1 for its global part and 1 for its cross where the key is real and its namespace learns that part
        x = torch.cat([stats.new_ones(stats.shape[0], 1), stats[:, self.cols]], 1)
        if keys is None:
            return x
        r = self.key_rates(keys)  # (B, 2M)
        real = (keys >= 0).repeat(1, 2)  # (B, 2M)
        return torch.cat([x, (real & (r > 0)).to(x.dtype)], 1)

    def key_rates(self, keys: torch.Tensor) -> torch.Tensor:
        # keys (B, M) -> (B, 2M): each key's global rate, then each key's cross rate (by its namespace)
        r = self.ns_rates[keys.clamp_min(0) & 15]  # (B, M, 2)
        return torch.cat([r[..., 0], r[..., 1]], 1)

    def rates(self, keys: torch.Tensor | None, n: int) -> torch.Tensor:
        # (n, C) or (C,) AdaGrad rate per input column: `lr` for the user's bias and features, the
        # namespace's rates for keys
        head = torch.full((1 + len(self.cols),), self.lr)
        if keys is None:
            return head
        return torch.cat([head.expand(n, -1), self.key_rates(keys)], 1)

    def logits(self, users: torch.Tensor, stats: torch.Tensor, keys: torch.Tensor | None = None,
               base: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the correction of the ranker's logits `base` as the table is now (no learning: serving, `trm eval`)."""
        out = (self.w[self.slots(users, keys)] * self.inputs(stats, keys)).sum(1)
        if self.stack_lr is not None and base is not None:
            out = out + self.stack[0] * base
        return out

    @torch.no_grad()
    def score_then_learn(self, base: torch.Tensor, users: torch.Tensor, stats: torch.Tensor,
                         labels: torch.Tensor, seconds: torch.Tensor, keys: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """(B,) combined logits of rows in event-time order, each second scored before it is learned.

        The loop runs in numpy on views of the buffers (the same memory), as the linear model's does
        (online_linear.py): a second holds a few rows, where torch's per-call overhead dominates."""
        s_all, x_all = (t.numpy() for t in (self.slots(users, keys), self.inputs(stats, keys)))  # (B, C) each
        lr_all = self.rates(keys, len(base)).numpy()  # (B, C) or (C,)
        w, g = self.w.numpy(), self.g.numpy()
        stack = self.stack.numpy() if self.stack_lr is not None else None
        power = w.dtype.type(self.power)
        base_np, y = base.numpy(), labels.numpy().astype(w.dtype)
        out = np.empty(len(base_np), dtype=base_np.dtype)
        for sec in per_second(seconds.numpy()):
            s, x, z0 = s_all[sec], x_all[sec], base_np[sec]  # (n, C), (n, C), (n,)
            z = z0 + (w[s] * x).sum(1)  # 1. scored as the table was before the second
            if stack is not None:
                z = z + stack[0] * z0
            out[sec] = z
            err = sigmoid(z) - y[sec]  # (n,) d logloss / d z
            if stack is not None:  # 2. the weight on the ranker's logit learns
                gs = err * z0
                stack[1] += (gs * gs).sum()
                stack[0] -= self.stack_lr * gs.sum() / stack[1] ** power
            grad = err[:, None] * x  # (n, C) d logloss / d w
            lr = lr_all if lr_all.ndim == 1 else lr_all[sec]
            flat = s.ravel()
            np.add.at(g, flat, (grad * grad).ravel())  # 3. then the table
            np.add.at(w, flat, (-lr * grad / g[s] ** power).ravel())
        return torch.from_numpy(out)
