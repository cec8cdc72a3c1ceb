"""One hyper-parameter set for every ranker, so TRM and its baselines differ only in item inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class RankerConfig:
    # tokenizer geometry (from the fitted HybridTokenizer)
    num_levels: int = 3  # L: gen-tokens per item
    codebook_size: int = 256  # K: ids per level; gen ids are level-offset, level l uses [l*K, (l+1)*K)
    # feature tokens fed to the backbone: N_q query + N_u user + N_i item + 1 stats = n_tokens
    n_query_tokens: int = 2  # N_q (MovieLens has no query: learned "no query" tokens)
    n_user_tokens: int = 2  # N_u
    n_item_tokens: int = 3  # N_i
    n_stats: int = 4  # user_n_events, user_n_positives, item_n_interactions, item_n_positives
    hist_len: int = 20  # H: last H positive items of the user
    max_wide: int = 8  # most wide-side ids (mem-tokens / n-grams) read per item
    # backbone
    d_model: int = 64
    n_blocks: int = 2
    backbone: str = "rankmixer"  # rankmixer | transformer
    n_heads: int = 4  # transformer backbone and generative head
    ffn_mult: int = 2
    dropout: float = 0.0
    # sparse tables
    wide_buckets: int = 1 << 14  # hashed table for mem-tokens / n-gram ids
    id_buckets: int = 1 << 16  # hashed item-ID table of the ID baseline (~7x the live items, as in DLRM)
    # TRM specifics
    token_dropout: float = 0.1  # deep side: drop whole gen-token embeddings while training
    ntp_weight: float = 0.1  # λ in L = L_d + λ·L_g
    gen_layers: int = 1  # causal transformer blocks of the generative head

    @property
    def gen_vocab_size(self) -> int:
        return self.num_levels * self.codebook_size

    @property
    def n_tokens(self) -> int:
        return self.n_query_tokens + self.n_user_tokens + self.n_item_tokens + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RankerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
