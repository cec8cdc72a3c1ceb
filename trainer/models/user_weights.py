"""Per-user online weights: a correction of the ranker's logit learned from each user's own stream,
second by second (Monolith trains per-user parameters online for the same reason).

Why: the rankers learn once per chunk of 256 events, while 94 % of consecutive events share a user
and most users evaluated after the cutoff are new there. A peer that learns per event (Vowpal
Wabbit) loses 0.02 AUC when it may learn only once per 256 events, and most of that is its per-user
weights (ml-latest-small, validation window [q0.4, median): 0.7804 per event, 0.7676 per 256; with
no user namespace 0.7685). This module gives every ranker the same per-user part, learned at the
peer's pace:

    logit = ranker_logit(x) + b_u + Σ_j w_uj · x_j      x = a few request-time features (FEATURES)

(b_u, w_u) live in a hashed table (`2**bits` slots, as VW's `-b`), learned by AdaGrad on the
logistic loss of the *combined* logit; the ranker itself keeps training on its own BCE, so the
correction learns what the ranker leaves in the residual of this user's events. The inputs are
user and context features every model reads, so the model comparison still differs only in the
item side. On the validation window (trm_no_ntp, 2 seeds) it took 0.7577 to 0.7663 AUC; the
user × gen-prefix crosses added 0.001 more and all 22 features per user lost 0.009 (too many
weights per user), so neither is used.

Ordering, the point-in-time rule: the events of one second are all scored with the weights as they
were before that second, then all of them update. An event's score never depends on its own label
nor on any event of its second. Events arrive in event-time order (trainer.kafka_source); a second
that recurs later (late data) is simply a new group.

The table is a pair of buffers of the ranker that owns it (`Ranker.user_weights`), so checkpoints,
published versions and `trm eval` carry it with the weights it corrects.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..features import IDX

FEATURES = ("user_rate_logit", "item_rate_logit", "last5_rate_logit", "prefix1_rate_logit")
_MIX_U, _MIX_J = 0x9E3779B1, 0x85EBCA77  # odd multipliers of a multiplicative hash


class UserWeights(nn.Module):
    def __init__(self, bits: int = 18, lr: float = 0.1, g0: float = 1e-2, features: tuple[str, ...] = FEATURES):
        super().__init__()
        self.lr, self.mask = lr, (1 << bits) - 1
        self.register_buffer("cols", torch.tensor([IDX[f] for f in features], dtype=torch.long), persistent=False)
        self.register_buffer("w", torch.zeros(1 << bits))  # weights
        self.register_buffer("g", torch.full((1 << bits,), g0))  # AdaGrad: running sum of squared gradients

    def slots(self, users: torch.Tensor) -> torch.Tensor:
        # users (B,) -> (B, 1+F) table slots: bias, then one per feature
        j = torch.arange(1 + len(self.cols), device=users.device)
        return ((users.unsqueeze(1) * _MIX_U) ^ (j * _MIX_J)) & self.mask

    def inputs(self, stats: torch.Tensor) -> torch.Tensor:
        # stats (B, N_DENSE) -> (B, 1+F): a constant 1 (the bias) and the chosen features
        return torch.cat([stats.new_ones(stats.shape[0], 1), stats[:, self.cols]], 1)

    def logits(self, users: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """(B,) the correction as the table is now (no learning: serving, `trm eval`)."""
        return (self.w[self.slots(users)] * self.inputs(stats)).sum(1)

    @torch.no_grad()
    def score_then_learn(self, base: torch.Tensor, users: torch.Tensor, stats: torch.Tensor,
                         labels: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
        """(B,) combined logits of rows in event-time order, each second scored before it is learned."""
        s_all, x_all = self.slots(users), self.inputs(stats)  # (B, 1+F) each
        out = torch.empty_like(base)
        cut = torch.nonzero(seconds[1:] != seconds[:-1]).flatten() + 1
        bounds = [0, *cut.tolist(), len(base)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            s, x = s_all[a:b], x_all[a:b]  # (n, 1+F)
            z = base[a:b] + (self.w[s] * x).sum(1)  # (n,)
            out[a:b] = z
            grad = (torch.sigmoid(z) - labels[a:b]).unsqueeze(1) * x  # (n, 1+F) d logloss / d w
            self.g.index_add_(0, s.flatten(), (grad * grad).flatten())
            self.w.index_add_(0, s.flatten(), (-self.lr * grad / self.g[s].sqrt()).flatten())
        return out
