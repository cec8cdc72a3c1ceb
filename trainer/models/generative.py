"""The generative auxiliary objective of §3.3: next-token prediction of a positive item's gen-tokens.

Sequence: [context (N_q + N_u) | BOS | s_1 .. s_{L-1}], predicting s_1 .. s_L at BOS .. s_{L-1}.
Level j is predicted from level j's K ids only (not the full L*K vocabulary): the tokenizer's
level-offset layout makes every other id impossible there, so spending probability on them adds
nothing. The output layer is tied to the ranker's gen-token table.

Which parameters NTP may move (bench/ntp_gradients.py measures it): with its gradient reaching the
gen-token table (teacher-forced inputs and tied outputs), λ·NTP pushed that table as hard as the
ranking BCE did (norm ratio 0.96 at λ = 0.1, mean over levels) in an orthogonal direction (cosine
0.00), so it was noise for ranking. By default (`ntp_item_grad`, `ntp_tied_grad` False) the table
is read detached here: NTP trains its own head and the user tower it conditions on (the context),
which is where the paper's generative objective is meant to help.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import TransformerBlock
from .config import RankerConfig
from .embedding import GenTokenEmbedding


def semi_causal_mask(n_context: int, n_gen: int) -> torch.Tensor:
    """(S, S) boolean, True = row may attend to column; S = n_context + n_gen.

    Context tokens see each other (and only each other); BOS and item tokens see all the
    context plus the item tokens up to and including themselves (causal).
    """
    S = n_context + n_gen
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    mask[:n_context, :n_context] = True
    return mask


class GenerativeHead(nn.Module):
    """Small causal transformer over context + BOS + gen-tokens, with the semi-causal mask."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        D, L = cfg.d_model, cfg.num_levels
        self.n_context = cfg.n_query_tokens + cfg.n_user_tokens
        self.num_levels = L
        self.tied_grad, self.mean_levels, self.item_grad = cfg.ntp_tied_grad, cfg.ntp_mean_levels, cfg.ntp_item_grad
        self.bos = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos = nn.Parameter(torch.randn(self.n_context + L, D) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(D, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
                                    for _ in range(cfg.gen_layers))
        self.ln_f = nn.LayerNorm(D)
        self.register_buffer("mask", semi_causal_mask(self.n_context, L), persistent=False)

    def level_logits(self, context: torch.Tensor, gen: torch.Tensor, emb: GenTokenEmbedding) -> torch.Tensor:
        # context (B, C, D), gen (B, L) level-offset ids -> (B, L, K) logits of level j at row j
        B, C, D = context.shape
        L = self.num_levels
        prev = emb(gen[:, :L - 1])  # (B, L-1, D): teacher forcing
        if not self.item_grad:  # the gen table is the ranking objective's; NTP shapes the user tower
            prev = prev.detach()
        x = torch.cat([context, self.bos.expand(B, 1, D), prev], 1) + self.pos  # (B, C+L, D)
        for block in self.blocks:
            x = block(x, self.mask)
        h = self.ln_f(x[:, C:])  # (B, L, D): outputs at BOS .. s_{L-1}
        w = torch.stack([emb.level_weights(j) for j in range(L)])  # (L, K, D), tied
        if not self.tied_grad:  # tied values, but the softmax does not push every row of the table
            w = w.detach()
        return torch.einsum("bld,lkd->blk", h, w)

    def loss(self, context: torch.Tensor, gen: torch.Tensor, emb: GenTokenEmbedding,
             use: torch.Tensor) -> torch.Tensor:
        """Σ_j CE(s_j) (or its mean over levels) averaged over rows where `use` (positive label and
        known tokens); 0 if none."""
        if not bool(use.any()):
            return context.new_zeros(())
        context, gen = context[use], gen[use]
        logits = self.level_logits(context, gen, emb)  # (b, L, K)
        K = logits.shape[-1]
        target = gen - torch.arange(self.num_levels, device=gen.device) * K  # level-local ids (b, L)
        ce = F.cross_entropy(logits.reshape(-1, K), target.reshape(-1), reduction="none")
        ce = ce.view(-1, self.num_levels)
        return (ce.mean(1) if self.mean_levels else ce.sum(1)).mean()
