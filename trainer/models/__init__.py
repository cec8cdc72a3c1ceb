"""Ranker families: TRM and the baselines it is compared with, plus parameter accounting."""
from __future__ import annotations

import torch.nn as nn

from .baselines import GenOnlyRanker, IDRanker, NGramRanker
from .config import RankerConfig
from .generative import GenerativeHead, semi_causal_mask
from .ranker import Ranker
from .trm import TRM

MODEL_NAMES = ("trm", "id", "gen_only", "two_gram", "prefix_ngram")


def build_model(name: str, cfg: RankerConfig) -> Ranker:
    """A ranker by name: trm | trm_transformer | trm_no_ntp | id | gen_only | two_gram | prefix_ngram."""
    if name == "trm":
        return TRM(cfg)
    if name == "trm_no_ntp":
        return TRM(cfg, generative=False)
    if name == "trm_transformer":
        return TRM(RankerConfig.from_dict({**cfg.to_dict(), "backbone": "transformer"}))
    if name == "id":
        return IDRanker(cfg)
    if name == "gen_only":
        return GenOnlyRanker(cfg)
    if name in ("two_gram", "prefix_ngram"):
        return NGramRanker(cfg, name)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES + ('trm_no_ntp', 'trm_transformer')}")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(dense, sparse): embedding tables are sparse, every other parameter dense; shared tensors once."""
    sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    dense = sparse = 0
    for p in model.parameters():  # .parameters() already yields a shared tensor once
        if id(p) in sparse_ids:
            sparse += p.numel()
        else:
            dense += p.numel()
    return dense, sparse


__all__ = ["MODEL_NAMES", "GenOnlyRanker", "GenerativeHead", "IDRanker", "NGramRanker", "Ranker",
           "RankerConfig", "TRM", "build_model", "count_params", "semi_causal_mask"]
