"""A per-event linear model beside every ranker, averaged with it: two learners that err differently.

    logit = (1 - a) · (ranker_logit + user-table correction) + a · z_lin        (a = cfg.linear_mix)

    z_lin = Σ_j w_j · x_j / n_j       (hashed slots j, n_j the largest |x_j| seen: VW's --normalized)

    inputs j: a bias, a per-user bias;
              global weights on the raw log counts (C_FEATURES) and on the rate logits (R_FEATURES),
              a user × rate weight per rate logit;
              the item's linear keys (`Ranker.linear_keys`: TRM's lexical tokens and era keys, the ID
              baseline's item id, the other token models' online keys), each as a global weight and a
              user × key cross (VW's -q ug -q ut)

Why: the per-user table (user_weights.py) corrects the ranker's logit, so it learns only the
ranker's residual; Vowpal Wabbit, learning one linear model per event on similar inputs, led on
items the tokenizer never saw, from their 1st to about their 30th interaction (validation window
[q0.4, q0.5) with a tokenizer fitted at q0.4, AUC on 3-10 interactions: VW 0.7285, trm 0.7122).
Giving the table the same inputs (title words global or crossed, collision-free slots, VW's
per-feature scaling, global weights on every feature) moved that by at most +0.0025; a VW-like model
learned on its own loss, with no ranker logit among its inputs, scores below the ranker alone
(0.7768 vs 0.7777) and VW given the ranker's logit did not improve either, but their average beats
both: 0.7777 -> 0.7809 overall and 0.7185 -> 0.7254 on unseen items, 0.7784 -> 0.7811 on the window
before the demo's tokenizer cutoff (means of two seeds, replays of the real trainer's recordings:
bench/online_sweep.py). Mixes 0.4 / 0.6 and a mix learned online did no better than 0.5.
With all of TRM's online keys instead of the lexical tokens: 0.7785; lexical + gen prefixes 0.7803.

Learning: AdaGrad with power (lr / (g0 + Σ grad²)^power per slot, as the table and the peer's
--power_t), on this model's own logistic loss (not the mixed one: each learner stays itself).
Ordering, the point-in-time rule (as user_weights.py): a second's events are all scored with the
weights and scales as they were before that second (an event's scale may use its own features,
never another's of its second), then all of them update. Items are never identified by ID in a
token model: the ID baseline alone gets the item id as a key.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..features import IDX
from .embedding import hash_ids
from .user_weights import per_second, sigmoid

C_FEATURES = ("log1p_user_n_events", "log1p_user_n_positives", "log1p_item_n_interactions",
              "log1p_item_n_positives", "log1p_item_age_h", "log1p_since_last_event")
R_FEATURES = ("user_rate_logit", "item_rate_logit", "last20_rate_logit", "last5_rate_logit", "last1_rate_logit")
_SALT, _CROSS_SALT, _MIX_U = 0x3C6EF372, 0x6A09E667, 0x9E3779B1
# input kinds, the low 6 bits of a slot's id before hashing
_BIAS, _USER, _KEY, _CROSS, _C, _R, _UR = 0, 1, 2, 3, 5, 6, 7


def _tagged(value: torch.Tensor, tag: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """value * 64 + tag where real (default: value >= 0), else -1 (padding: read with input 0)."""
    real = value >= 0 if real is None else real
    return torch.where(real, value * 64 + tag, torch.full_like(value, -1))


_SMALL_USER = 1 << 52  # user ids below it are used as they are: id * 32 (user x rate), tagged (x 64), fits int64


def _user_ids(users: torch.Tensor) -> torch.Tensor:
    """(B,) user ids (opaque int64: hashes in production) -> (B,) ids below 2**53: small ones as they are,
    others hashed above them (those past 2**57 overflowed when tagged, and were read as padding)."""
    small = (users >= 0) & (users < _SMALL_USER)
    return torch.where(small, users, _SMALL_USER + hash_ids(users, (1 << 31) - 1))


class OnlineLinear(nn.Module):
    def __init__(self, bits: int = 20, lr: float = 0.06, power: float = 0.3, g0: float = 1e-6):
        super().__init__()
        self.lr, self.power, self.size = lr, power, 1 << bits
        self.register_buffer("c_cols", torch.tensor([IDX[f] for f in C_FEATURES]), persistent=False)
        self.register_buffer("r_cols", torch.tensor([IDX[f] for f in R_FEATURES]), persistent=False)
        self.register_buffer("w", torch.zeros(self.size))  # weights
        self.register_buffer("g", torch.full((self.size,), g0))  # g0 + running sum of squared gradients
        self.register_buffer("n", torch.zeros(self.size))  # largest |input| seen per slot

    def inputs(self, users: torch.Tensor, stats: torch.Tensor, keys: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # users (B,), stats (B, N_DENSE) raw, keys (B, M) non-negative or -1 -> slots (B, C), inputs (B, C)
        B = len(users)
        u = _user_ids(users).unsqueeze(1)  # (B, 1)
        c, r = self.c_cols, self.r_cols
        ids = [torch.full((B, 1), _BIAS, dtype=torch.long, device=users.device), _tagged(u, _USER),
               _tagged(c, _C).expand(B, -1), _tagged(r, _R).expand(B, -1),
               _tagged(u * 32 + torch.arange(len(r), device=users.device), _UR)]
        xs = [stats.new_ones(B, 2), stats[:, c], stats[:, r], stats[:, r]]
        if keys is not None:
            real = keys >= 0
            cross = hash_ids(keys, (1 << 31) - 1, _CROSS_SALT) ^ (u * _MIX_U)
            ids += [_tagged(keys, _KEY), _tagged(cross, _CROSS, real)]
            xs += [real.to(stats.dtype)] * 2
        ids, x = torch.cat(ids, 1), torch.cat(xs, 1)
        return hash_ids(ids, self.size, _SALT), torch.where(ids >= 0, x, torch.zeros_like(x))

    def _score(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # (n, C) slots and inputs -> (n,): scales from earlier seconds, or the event's own |x| if larger
        return (self.w[s] * x / torch.maximum(self.n[s], x.abs()).clamp_min(1e-12)).sum(1)

    def logits(self, users: torch.Tensor, stats: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """(B,) as the model is now (no learning: serving, `trm eval`)."""
        return self._score(*self.inputs(users, stats, keys))

    @torch.no_grad()
    def score_then_learn(self, users: torch.Tensor, stats: torch.Tensor, keys: torch.Tensor | None,
                         labels: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
        """(B,) logits of rows in event-time order, each second scored before it is learned.

        The loop runs in numpy on views of the buffers (the same memory): a second holds a few rows,
        and numpy's per-call overhead on such small arrays is a fraction of torch's (15x faster here)."""
        s_all, x_all = (t.numpy() for t in self.inputs(users, stats, keys))  # (B, C) each
        w, g, n = self.w.numpy(), self.g.numpy(), self.n.numpy()
        y = labels.numpy().astype(w.dtype)
        lr, power = w.dtype.type(self.lr), w.dtype.type(self.power)
        out = np.empty(len(y), dtype=w.dtype)
        for sec in per_second(seconds.numpy()):
            s, x = s_all[sec], x_all[sec]  # (n, C)
            ax = np.abs(x)
            z = (w[s] * x / np.maximum(np.maximum(n[s], ax), 1e-12)).sum(1)  # 1. scored as before the second
            out[sec] = z
            flat = s.ravel()
            np.maximum.at(n, flat, ax.ravel())  # 2. the scales take in its inputs
            xh = x / np.maximum(n[s], 1e-12)
            grad = (sigmoid(z) - y[sec])[:, None] * xh  # 3. this model's own logistic loss
            np.add.at(g, flat, (grad * grad).ravel())
            np.add.at(w, flat, (-lr * grad / g[s] ** power).ravel())
        return torch.from_numpy(out)
