"""Baselines on TRM's backbone, hyper-parameters and context; only the item inputs differ.

  id            DLRM-style: hashed item-ID table (sized like a real ID table); history as item IDs
  gen_only      TIGER-style: gen-tokens only (deep side, no wide side, no NTP)
  two_gram      gen-tokens + hashed 2-grams of them on the wide side (no NTP)
  prefix_ngram  gen-tokens + hashed prefix n-grams (SEMID) on the wide side (no NTP)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import RankerConfig
from .embedding import GenTokenEmbedding, HashedBagEmbedding
from .ranker import Ranker
from .trm import DeepGenTokens, GenHistory, WideTokens
from .user_weights import ID_NS, PREFIX_NGRAM_NS, TWO_GRAM_NS, key


class IDRanker(Ranker):
    """Item-ID baseline: one hashed row per item, shared by the target item and the history."""

    def __init__(self, cfg: RankerConfig):
        super().__init__(cfg)
        self.inputs = ("item_id", *self.history_inputs(cfg, ("recent_ids",), ("hist_ids",)), "stats", "label", "known")
        self.id_emb = HashedBagEmbedding(cfg.id_buckets, cfg.d_model, seed=7)
        D = cfg.d_model
        self.item_mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, cfg.n_item_tokens * D))

    def item_tokens(self, batch) -> torch.Tensor:
        e = self.id_emb.lookup(batch.item_id)  # (B, D)
        return self.item_mlp(e).view(e.shape[0], self.cfg.n_item_tokens, -1)  # (B, N_i, D)

    def history_items(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch.recent_ids if self.recent else batch.hist_ids
        return self.id_emb.lookup(ids), ids >= 0  # (B, H|R, D), (B, H|R)

    def item_keys(self, batch) -> torch.Tensor:
        return key(batch.item_id, ID_NS).unsqueeze(1)  # (B, 1)


class GenOnlyRanker(Ranker):
    """TIGER-style: semantic ids replace the item ID; nothing memorises combinations."""

    def __init__(self, cfg: RankerConfig):
        super().__init__(cfg)
        self.inputs = ("gen", *self.history_inputs(cfg, ("recent_gen",), ("hist_gen",)), "stats", "label", "known")
        self.gen_emb = GenTokenEmbedding(cfg.num_levels, cfg.codebook_size, cfg.d_model)
        self.deep = DeepGenTokens(cfg, self.gen_emb, token_dropout=0.0)
        self.history = GenHistory(self.gen_emb)

    def item_tokens(self, batch) -> torch.Tensor:
        return self.deep(batch.gen)

    def item_keys(self, batch) -> torch.Tensor:
        return self.gen_prefix_keys(self.cfg, batch.gen)  # (B, L)

    def history_items(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.history(batch.recent_gen if self.recent else batch.hist_gen)


class NGramRanker(GenOnlyRanker):
    """Gen-tokens plus a fixed n-gram scheme (2-gram or SEMID prefix-ngram) on the wide side."""

    def __init__(self, cfg: RankerConfig, field: str):
        super().__init__(cfg)
        assert field in ("two_gram", "prefix_ngram"), field
        self.field = field
        self.inputs = ("gen", field, *self.history_inputs(cfg, ("recent_gen",), ("hist_gen",)), "stats", "label", "known")
        self.wide = WideTokens(cfg, seed=2 if field == "two_gram" else 3)

    def item_tokens(self, batch) -> torch.Tensor:
        return self.deep(batch.gen) + self.wide(getattr(batch, self.field))

    def item_keys(self, batch) -> torch.Tensor:
        # (prefix_ngram's n-grams shared the categories' namespace 11, and so their rates, until 2026-12-07)
        ns = TWO_GRAM_NS if self.field == "two_gram" else PREFIX_NGRAM_NS
        return torch.cat([self.gen_prefix_keys(self.cfg, batch.gen), key(getattr(batch, self.field), ns)], 1)
