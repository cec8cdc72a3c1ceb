"""What every ranker shares: query/user/stats context tokens, the backbone and the BCE head.

A model family only says how an item (and a history item) becomes vectors; that keeps the
comparison to the paper's Table 1 setting: same backbone and hyper-parameters, different item inputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone
from .config import RankerConfig
from .online_linear import OnlineLinear
from .user_weights import KEY_VALUES, MEM_NS, UserWeights, key, ns_rates


class HistoryPool(nn.Module):
    """N_u learned queries attend over the user's history items -> N_u user tokens.

    A learned "empty history" key/value is always present, so cold users get a real token, not NaN.
    """

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        D = cfg.d_model
        self.n_heads = cfg.n_heads
        self.queries = nn.Parameter(torch.randn(cfg.n_user_tokens, D) * 0.02)
        self.empty = nn.Parameter(torch.zeros(1, 1, D))
        self.k, self.v, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # hist (B, H, D), mask (B, H) True = real item -> (B, N_u, D)
        B, _, D = hist.shape
        hist = torch.cat([self.empty.expand(B, 1, D), hist], 1)  # (B, 1+H, D)
        mask = torch.cat([mask.new_ones(B, 1), mask], 1)  # (B, 1+H)
        nh, hd = self.n_heads, D // self.n_heads
        q = self.queries.view(1, -1, nh, hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, nh, N_u, hd)
        k = self.k(hist).view(B, -1, nh, hd).transpose(1, 2)  # (B, nh, 1+H, hd)
        v = self.v(hist).view(B, -1, nh, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, nh, N_u, hd)
        return self.out(y.transpose(1, 2).reshape(B, -1, D))


class StatsScale(nn.Module):
    """Standardizes the request-time features with the mean / std of the first rows trained on.

    Why: the features live on very different scales (log1p hours since the user's last event up to
    18, a rate logit within ±3, shares near 0), and Adam's steps are the same size in weight space
    whatever an input's scale: a feature of mean 8 moves the logit eight times as far per step as
    one of mean 1. Frozen after the first training rows (labelled past the trainer already owns, so
    no row is scaled by its own future); buffers, so checkpoints and serving carry them.
    """

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("inv_std", torch.ones(n))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit_once(self, x: torch.Tensor) -> None:
        # x (B, F): the first rows trained on; later calls change nothing
        if bool(self.fitted) or len(x) < 2:
            return
        self.mean.copy_(x.mean(0))
        self.inv_std.copy_(1.0 / x.std(0).clamp_min(0.05))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std  # (B, F)


class Ranker(nn.Module):
    """Base ranker: tokens = [query (N_q) | user (N_u) | item (N_i) | stats (1)] -> backbone -> logit.

    User tokens pool the user's last R labelled events (`history="recent"`: each event's item
    vector plus an embedding of its label, so negatives count too), or, in models configured
    before that, the last H positives. With `wide_dense` a linear term on the request-time
    features is added to the logit (Wide & Deep): the rates and affinities those features hold
    are nearly linear in the log-odds, and a linear part learns them in a few hundred steps.

    Subclasses implement `item_tokens` and `history_items` (item vectors of the user's history:
    the recent events or the positives, whichever `cfg.history` names), and list the batch fields
    they read in `inputs` (the trainer hands a model nothing else).
    """

    inputs: tuple[str, ...] = ()
    mem_tables: tuple[str, ...] = ()  # submodules: hashed tables over mem-token ids (trainer/migrate.py remaps them)

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        if cfg.num_levels > MEM_NS:  # the gen prefixes' online keys use namespaces 0 .. L-1 (user_weights.py)
            raise ValueError(f"num_levels={cfg.num_levels}: the rankers' online keys allow at most {MEM_NS} levels")
        self.cfg = cfg
        D = cfg.d_model
        self.query_tokens = nn.Parameter(torch.randn(cfg.n_query_tokens, D) * 0.02)  # learned "no query"
        self.history_pool = HistoryPool(cfg)
        self.stats_proj = nn.Linear(cfg.n_stats, D)
        self.backbone = Backbone(cfg)
        self.head = nn.Sequential(nn.Linear(cfg.n_tokens * D, D), nn.GELU(), nn.Linear(D, 1))
        if cfg.history == "recent":
            self.label_emb = nn.Parameter(torch.randn(2, D) * 0.02)  # negative / positive
        elif cfg.history != "positives":
            raise ValueError(f"unknown history {cfg.history!r}: recent | positives")
        self.wide_dense = nn.Linear(cfg.n_stats, 1) if cfg.wide_dense else None
        self.stats_scale = StatsScale(cfg.n_stats) if cfg.stats_scale else None
        if cfg.stats_scale:  # the deep part starts at 0: an untrained model is its linear part alone
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        # buffers, not parameters: learned online by the Learner, never by the optimizer
        self.user_weights = UserWeights(cfg.user_bits, cfg.user_lr, key_lr=cfg.key_lr,
                                        power=cfg.user_power, features=tuple(cfg.user_features.split(",")),
                                        stack_lr=cfg.stack_lr, key_global_lr=cfg.key_global_lr,
                                        ns_rates=ns_rates(cfg)
                                        ) if cfg.user_weights else None
        self.online_linear = OnlineLinear(cfg.linear_bits, cfg.linear_lr, cfg.linear_power) if cfg.linear_mix > 0 else None

    @property
    def recent(self) -> bool:
        return self.cfg.history == "recent"

    @staticmethod
    def history_inputs(cfg: RankerConfig, recent: tuple[str, ...], positives: tuple[str, ...]) -> tuple[str, ...]:
        return recent + ("recent_labels",) if cfg.history == "recent" else positives

    # --- per family --------------------------------------------------------------------------
    def item_tokens(self, batch) -> torch.Tensor:
        """(B, N_i, D) item feature tokens."""
        raise NotImplementedError

    def history_items(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, D) one vector per history item, and its (B, H) validity mask."""
        raise NotImplementedError

    def item_keys(self, batch) -> torch.Tensor | None:
        """(B, M) the item's online keys (models/user_weights.py, -1 pads), or None: what the
        per-user table crosses with the user, learned per second. Only the item side differs."""
        return None

    @staticmethod
    def gen_prefix_keys(cfg: RankerConfig, gen: torch.Tensor) -> torch.Tensor:
        """(B, L) level-offset gen ids -> (B, L) keys of the prefixes c1, c1c2, ... (namespaces 0..L-1):
        the tokenizer's hierarchy of categories, coarse to fine."""
        V = cfg.gen_vocab_size + cfg.num_levels  # ids incl. the per-level unknown ids
        M = min(KEY_VALUES, (2 ** 63 - 1) // V)  # p * V + g stays within int64 (a no-op while V ** L < M: L <= 5 at K = 256)
        out, p = [], torch.zeros_like(gen[:, 0])
        for level in range(gen.shape[1]):
            p = torch.remainder(p * V + gen[:, level], M)
            out.append(key(p, level))
        return torch.stack(out, 1)

    def linear_keys(self, batch) -> torch.Tensor | None:
        """(B, M) the item's keys the per-event linear model reads (models/online_linear.py): by default
        the online keys; a family whose keys that model reads better says which."""
        return self.item_keys(batch)

    # --- shared ------------------------------------------------------------------------------
    def online_keys(self, batch) -> torch.Tensor | None:
        return self.item_keys(batch) if self.cfg.online_keys else None

    def mix(self, logit: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        """(B,) the ranker's (corrected) logit averaged with the linear model's, `cfg.linear_mix` its share."""
        a = self.cfg.linear_mix
        return (1 - a) * logit + a * linear

    def context_tokens(self, batch) -> torch.Tensor:
        """(B, N_q + N_u, D): the query and user tokens (the generative objective's context)."""
        hist, mask = self.history_items(batch)  # (B, H|R, D), (B, H|R)
        if self.recent:
            lab = batch.recent_labels
            mask = lab >= 0
            hist = (hist + self.label_emb[lab.clamp_min(0)]) * mask.unsqueeze(-1)
        user = self.history_pool(hist, mask)  # (B, N_u, D)
        B = user.shape[0]
        query = self.query_tokens.unsqueeze(0).expand(B, -1, -1)  # (B, N_q, D)
        return torch.cat([query, user], 1)

    def score(self, batch, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) logits."""
        if context is None:
            context = self.context_tokens(batch)
        dense = self.dense_inputs(batch)  # (B, F)
        stats = self.stats_proj(dense).unsqueeze(1)  # (B, 1, D)
        x = torch.cat([context, self.item_tokens(batch), stats], 1)  # (B, T, D)
        x = self.backbone(x)
        logit = self.head(x.flatten(1)).squeeze(-1)  # (B,)
        if self.wide_dense is not None:
            logit = logit + self.wide_dense(dense).squeeze(-1)
        return logit

    def fit_stats_scale(self, stats: torch.Tensor) -> None:
        """Fix the features' standardization from the first rows trained on (no-op after, or without it)."""
        if self.stats_scale is not None:
            self.stats_scale.fit_once(stats[:, :self.cfg.n_stats])

    def dense_inputs(self, batch) -> torch.Tensor:
        """(B, F) the request-time features the backbone and the wide logit read (standardized)."""
        dense = batch.stats[:, :self.cfg.n_stats]
        return dense if self.stats_scale is None else self.stats_scale(dense)

    def forward(self, batch) -> torch.Tensor:
        return self.score(batch)

    def personal_logit(self, batch, users: torch.Tensor) -> torch.Tensor:
        """(B,) the ranker's logit plus the per-user correction, averaged with the linear model, as they
        stand (serving, evaluation)."""
        logit = self.score(batch)
        if self.user_weights is not None:
            logit = logit + self.user_weights.logits(users, batch.stats, self.online_keys(batch), logit)
        if self.online_linear is not None:
            logit = self.mix(logit, self.online_linear.logits(users, batch.stats, self.linear_keys(batch)))
        return logit

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(total loss, logits, loss parts); the base objective is BCE only."""
        logits = self.score(batch)
        bce = F.binary_cross_entropy_with_logits(logits, batch.label)
        return bce, logits, {"bce": bce.item()}
