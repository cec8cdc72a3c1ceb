"""Backbones over feature tokens: a RankMixer block and a plain transformer block.

Both map (B, T, D) -> (B, T, D); the ranker flattens the result into a BCE head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RankerConfig


class SelfAttention(nn.Module):
    """Multi-head attention with an optional boolean mask (True = may attend)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must divide into heads"
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, mult: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, mult * d_model)
        self.out = nn.Linear(mult * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block; the mask makes it causal or semi-causal when given."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.mlp = MLP(d_model, ffn_mult, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class PerTokenFFN(nn.Module):
    """RankMixer's per-token FFN: every feature token has its own weights (heterogeneous features)."""

    def __init__(self, n_tokens: int, d_model: int, mult: int, dropout: float = 0.0):
        super().__init__()
        h = mult * d_model
        self.w1 = nn.Parameter(torch.randn(n_tokens, d_model, h) * d_model ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(n_tokens, h))
        self.w2 = nn.Parameter(torch.randn(n_tokens, h, d_model) * h ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(n_tokens, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.einsum("btd,tdh->bth", x, self.w1) + self.b1)  # (B, T, h)
        return self.drop(torch.einsum("bth,thd->btd", h, self.w2) + self.b2)  # (B, T, D)


def token_mix(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free multi-head token mixing with H = T heads: slot (t, h) goes to (h, t).

    Token t is cut into T heads of D/T; new token h concatenates head h of every token, so each
    output token sees a slice of every input feature token.
    """
    B, T, D = x.shape  # (B, T, D) -> (B, T, T, D/T) -> swap token/head -> (B, T, D)
    return x.view(B, T, T, D // T).transpose(1, 2).reshape(B, T, D)


class RankMixerBlock(nn.Module):
    """S = LN(TokenMixing(X) + X);  X' = LN(PFFN(S) + S)   (post-LN, as in RankMixer)."""

    def __init__(self, n_tokens: int, d_model: int, ffn_mult: int, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_tokens == 0, f"RankMixer needs d_model ({d_model}) divisible by tokens ({n_tokens})"
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = PerTokenFFN(n_tokens, d_model, ffn_mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(token_mix(x) + x)
        return self.ln2(self.ffn(x) + x)


class Backbone(nn.Module):
    """A stack of RankMixer or transformer blocks over the T feature tokens."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        T, D = cfg.n_tokens, cfg.d_model
        if cfg.backbone == "rankmixer":
            blocks = [RankMixerBlock(T, D, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_blocks)]
        elif cfg.backbone == "transformer":
            blocks = [TransformerBlock(D, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_blocks)]
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}: rankmixer | transformer")
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:  # (B, T, D) throughout
            x = block(x)
        return self.ln_f(x)
