"""TRM: the ranker that reads hybrid semantic tokens, never item IDs (§3.2-3.3 of the paper).

Item side, Wide & Deep:
  deep: gen-tokens (L level-offset ids) -> embeddings, whole tokens dropped at random while
        training (generalisation, shared across similar items) -> MLP -> N_i tokens
  wide: mem-tokens (BPE merges of gen-tokens) -> hashed table, mean -> linear -> N_i tokens
  hybrid item tokens = deep + wide
User side: the user's recent positive items as gen-tokens (same table), pooled into N_u tokens.
Objective: BCE + λ · NTP (generative head over the positive item's gen-tokens).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.lexical import TITLE_OFFSET, YEAR_OFFSET

from .config import RankerConfig
from .embedding import GenTokenEmbedding, HashedBagEmbedding
from .generative import GenerativeHead
from .ranker import Ranker
from .user_weights import CATEGORY_NS, DECADE_NS, MEM_NS, RELEASE_AGE_NS, TITLE_NS, key


class DeepGenTokens(nn.Module):
    """Deep side: (B, L) gen ids -> (B, N_i, D), with whole-token dropout in training."""

    def __init__(self, cfg: RankerConfig, emb: GenTokenEmbedding, token_dropout: float):
        super().__init__()
        D, L = cfg.d_model, cfg.num_levels
        self.emb, self.p, self.n_out = emb, token_dropout, cfg.n_item_tokens
        self.mlp = nn.Sequential(nn.Linear(L * D, 2 * D), nn.GELU(), nn.Linear(2 * D, cfg.n_item_tokens * D))

    def forward(self, gen: torch.Tensor) -> torch.Tensor:
        e = self.emb(gen)  # (B, L, D)
        if self.training and self.p > 0:
            keep = (torch.rand(e.shape[:2], device=e.device) >= self.p).unsqueeze(-1)  # (B, L, 1)
            e = e * keep / (1 - self.p)
        return self.mlp(e.flatten(1)).view(e.shape[0], self.n_out, -1)  # (B, N_i, D)


class WideTokens(nn.Module):
    """Wide side: (B, M) ids (mem-tokens or n-grams) -> hashed bag -> linear -> (B, N_i, D)."""

    def __init__(self, cfg: RankerConfig, seed: int):
        super().__init__()
        self.bag = HashedBagEmbedding(cfg.wide_buckets, cfg.d_model, seed)
        self.proj = nn.Linear(cfg.d_model, cfg.n_item_tokens * cfg.d_model)
        self.n_out = cfg.n_item_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bag(ids)).view(ids.shape[0], self.n_out, -1)  # (B, N_i, D)


class GenHistory(nn.Module):
    """History items as gen-tokens: (B, H, L) -> (B, H, D) sum of level embeddings (ids are level-offset).

    The mask marks real items (padding is -1); an item with unknown tokens uses the unknown rows."""

    def __init__(self, emb: GenTokenEmbedding):
        super().__init__()
        self.emb = emb

    def forward(self, hist_gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.emb(hist_gen).sum(2), hist_gen[..., 0] >= 0  # (B, H, D), (B, H)


class TRM(Ranker):
    """Hybrid-token ranker with the joint discriminative + generative objective."""

    mem_tables = ("wide.bag",)

    def __init__(self, cfg: RankerConfig, generative: bool = True):
        super().__init__(cfg)
        self.inputs = ("gen", "mem", "coarse", "lexical", "era",
                       *self.history_inputs(cfg, ("recent_gen",), ("hist_gen",)), "stats", "label", "known")
        self.gen_emb = GenTokenEmbedding(cfg.num_levels, cfg.codebook_size, cfg.d_model)
        self.deep = DeepGenTokens(cfg, self.gen_emb, cfg.token_dropout)
        self.wide = WideTokens(cfg, seed=1)
        self.history = GenHistory(self.gen_emb)
        self.generative = GenerativeHead(cfg) if generative and cfg.ntp_weight > 0 else None

    def item_tokens(self, batch) -> torch.Tensor:
        return self.deep(batch.gen) + self.wide(batch.mem)  # (B, N_i, D) Wide & Deep

    def history_items(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.history(batch.recent_gen if self.recent else batch.hist_gen)

    def item_keys(self, batch) -> torch.Tensor:
        # gen prefixes (B, L) + mem-tokens (B, M) [+ next-nearest level-1 codes (B, C), keyed as the
        # first prefix is: a code's key is the same whether it is the item's own or its neighbour]
        # [+ lexical tokens (B, 19): the words of the item's categories (CATEGORY_NS) and title (TITLE_NS),
        #  config.lexical_keys; the table learns each kind at its own rates (config.category_lr, title_lr)]
        # [+ era keys (B, 2): the decade (DECADE_NS) and the release age at the event (RELEASE_AGE_NS), config.era_keys]
        keys = [self.gen_prefix_keys(self.cfg, batch.gen), key(batch.mem, MEM_NS)]
        n = self.cfg.coarse_keys
        if n and batch.coarse is not None:
            keys.append(key(batch.coarse[:, 1:1 + n], 0))  # (B, n); -1 pads stay padding
        if self.cfg.lexical_keys and batch.lexical is not None:
            keys.append(self.lexical_keys(batch))
        if self.cfg.era_keys and batch.era is not None:
            keys.append(self.era_keys(batch))
        return torch.cat(keys, 1)

    @staticmethod
    def lexical_keys(batch) -> torch.Tensor:
        # (B, 19) the words of the item's categories (CATEGORY_NS) and title (TITLE_NS); -1 pads stay padding,
        # as does the release-year token (read as the era keys)
        lex = batch.lexical
        ns = torch.where(lex >= TITLE_OFFSET, TITLE_NS, CATEGORY_NS)
        return torch.where((lex >= 0) & (lex < YEAR_OFFSET), lex * 16 + ns, torch.full_like(lex, -1))

    @staticmethod
    def era_keys(batch) -> torch.Tensor:
        # (B, 2) the decade (DECADE_NS) and the release age (RELEASE_AGE_NS); -1 where the title has no year
        return torch.cat([key(batch.era[:, :1], DECADE_NS), key(batch.era[:, 1:], RELEASE_AGE_NS)], 1)

    def linear_keys(self, batch) -> torch.Tensor | None:
        # the linear model reads the lexical tokens (with all the online keys it scored 0.7785 against
        # 0.7809, models/online_linear.py) and the era keys; None where the item events carried no
        # lexical tokens (older pipelines)
        if batch.lexical is None:
            return None
        if self.cfg.era_keys and batch.era is not None:
            return torch.cat([self.lexical_keys(batch), self.era_keys(batch)], 1)
        return self.lexical_keys(batch)

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        context = self.context_tokens(batch)  # (B, N_q+N_u, D), shared by both objectives
        logits = self.score(batch, context)
        bce = F.binary_cross_entropy_with_logits(logits, batch.label)
        if self.generative is None:
            return bce, logits, {"bce": bce.item()}
        use = (batch.label > 0.5) & batch.known  # positives with real tokens only
        ntp = self.generative.loss(context, batch.gen, self.gen_emb, use)
        return bce + self.cfg.ntp_weight * ntp, logits, {"bce": bce.item(), "ntp": ntp.item()}
