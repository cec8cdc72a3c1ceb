"""Several rankers trained on the same joined batches, prequentially (test, then train).

Every batch is first scored by every model in eval mode (those scores are the prequential
metrics: the model has not trained on these rows yet), then each model takes its optimizer
steps on it. Models share the global torch RNG in a fixed order, so a run restored from a
checkpoint (which saves the RNG) continues bit-identically on the CPU (on a GPU, CUDA's embedding
backward is not deterministic: a resumed run continues the same way, not bit for bit). The protocol around it (join,
featurize, score, train, checkpoint, the reported metrics) is trainer/prequential.py.

Device: the rankers' parameters live on `LearnerConfig.device` ("auto": CUDA when torch sees a
GPU), each batch is moved there for their forward and backward passes, and logits come back to
the CPU. The per-user table (models/user_weights.py) and the linear model (models/online_linear.py)
stay on the CPU: they learn second by second, a few rows per update, where a GPU would spend its
time launching kernels.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .batch import Batch
from .errors import TrainerError
from .models import RankerConfig, build_model, count_params


@dataclass
class LearnerConfig:
    lr: float = 1e-3  # 2e-3 was unstable single-pass on MovieLens (seed spread up to 0.07 AUC)
    weight_decay: float = 0.0
    minibatch: int = 256  # optimizer-step size inside one joined micro-batch
    # rows scored before the models train on them: a joined micro-batch is scored and trained
    # chunk by chunk, so a row's score comes from weights that saw every earlier chunk (0: the
    # whole batch first). 256 instead of 2,048 was worth +0.004 AUC on the validation window.
    score_every: int = 256
    # learning rate of the linear (Wide & Deep) logit on the request-time features (None: `lr`):
    # at 1e-3 it moves too little in a single pass (validation window, 4 seeds: 0.7584 -> 0.7611 at
    # 1e-2, 0.7610 at 5e-3, 0.7571 at 3e-2; with the per-user weights 0.7662 -> 0.7673)
    wide_lr: float | None = 1e-2
    # after a warm start's linear fit (Learner.fit_linear), the wide logit's rate (0: it stays the fit)
    # (validation, seeds 0 / 1: 0 0.7784 / 0.7781, 1e-3 0.7784 / 0.7780, 1e-2 0.7779; 1e-3 kept: a linear part that
    # never moves cannot follow a drifting stream)
    wide_lr_after_fit: float = 1e-3
    epochs_per_batch: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = 1  # torch intra-op threads; small models run fastest on one (None: leave as is)
    # where the rankers train: auto (CUDA when torch sees a GPU, else CPU) | cpu | cuda | cuda:N;
    # default from TRM_TRAINER_DEVICE (as the encoder's TRM_ENCODER_DEVICE)
    device: str = field(default_factory=lambda: os.environ.get("TRM_TRAINER_DEVICE", "auto"))


def trainer_device(name: str) -> torch.device:
    """`name` resolved ("auto": CUDA when torch sees a GPU); a CUDA device torch cannot see is an error
    naming the fix, not a crash at the first batch."""
    from tokenizer.encoder import resolve_device

    dev = torch.device(resolve_device(name))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainerError(f"trainer device {name!r}: torch sees no CUDA GPU here "
                           "(use --device cpu or auto, or TRM_TRAINER_DEVICE=cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TrainerError(f"trainer device {name!r}: torch sees {torch.cuda.device_count()} GPU(s) here "
                           "(use --device cuda, cuda:0, or cpu)")
    return dev


class Learner:
    def __init__(self, names: list[str], cfg: RankerConfig, lcfg: LearnerConfig | None = None):
        self.names, self.cfg, self.lcfg = list(names), cfg, lcfg or LearnerConfig()
        if self.lcfg.threads:
            torch.set_num_threads(self.lcfg.threads)
        torch.manual_seed(self.lcfg.seed)  # seeds CUDA's generators too
        self.device = trainer_device(self.lcfg.device)
        self.models = {n: self._place(build_model(n, cfg)) for n in self.names}
        self.optimizers = {n: self._optimizer(m) for n, m in self.models.items()}
        self.busy_s = {n: 0.0 for n in self.names}  # seconds each model spent scoring and training
        self.rows_trained = {n: 0 for n in self.names}

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The ranker on the trainer's device, its per-user table and linear model on the CPU (module docstring)."""
        model.to(self.device)
        for online in ("user_weights", "online_linear"):
            if getattr(model, online, None) is not None:
                getattr(model, online).to("cpu")
        return model

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Adam; the wide logit's parameters in their own group when `wide_lr` is set."""
        lc = self.lcfg
        wide = [p for n, p in model.named_parameters() if n.startswith("wide_dense.")]
        if lc.wide_lr is None or not wide:
            return torch.optim.Adam(model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
        ids = {id(p) for p in wide}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return torch.optim.Adam([{"params": rest}, {"params": wide, "lr": lc.wide_lr}], lr=lc.lr,
                                weight_decay=lc.weight_decay)

    def param_counts(self) -> dict[str, tuple[int, int]]:
        return {n: count_params(m) for n, m in self.models.items()}

    @torch.no_grad()
    def logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The rankers' own logits (no per-user correction), eval mode (no token dropout)."""
        out = {}
        for n, m in self.models.items():
            t = time.perf_counter()
            m.eval()
            out[n] = m(batch.select(m.inputs).to(self.device)).float().cpu()
            self.busy_s[n] += time.perf_counter() - t
        return out

    def predict(self, batch: Batch) -> dict[str, np.ndarray]:
        """P(label = 1) per model from the rankers alone (the warm start validates on this)."""
        return {n: torch.sigmoid(z).numpy() for n, z in self.logits(batch).items()}

    def predict_then_learn_users(self, batch: Batch) -> dict[str, np.ndarray]:
        """P(label = 1) per model with its per-user correction and its linear model, which then learn these
        rows second by second (models/user_weights.py, models/online_linear.py: a second is scored before
        it is learned). Rows in event-time order."""
        out = {}
        for n, z in self.logits(batch).items():
            m = self.models[n]
            uw, view = m.user_weights, batch.select(m.inputs)
            if uw is not None and batch.user_id is not None:
                t = time.perf_counter()
                keys = m.online_keys(view)
                z = uw.score_then_learn(z, batch.user_id, batch.stats, batch.label, batch.event_time, keys)
                self.busy_s[n] += time.perf_counter() - t
            if m.online_linear is not None and batch.user_id is not None:  # its own loss, then the average
                t = time.perf_counter()
                lin = m.online_linear.score_then_learn(batch.user_id, batch.stats, m.linear_keys(view),
                                                       batch.label, batch.event_time)
                z = m.mix(z, lin)
                self.busy_s[n] += time.perf_counter() - t
            out[n] = torch.sigmoid(z).numpy()
        return out

    def examples_per_s(self) -> dict[str, float]:
        """Per model, rows trained per second of its own scoring and training (each model alone)."""
        return {n: self.rows_trained[n] / s for n, s in self.busy_s.items() if s > 0}

    def fit_linear(self, batch: Batch, l2: float = 1e-4, max_iter: int = 200) -> dict[str, float]:
        """Fit each model's wide logit alone, to convergence (L-BFGS, full batch), on `batch`: the
        warm start's training rows, before the deep part's epochs. Returns each fit's training logloss.

        Why: on the validation window the joint single-rate Adam fit left the ranker's logit below a
        logistic regression on the same 22 features (a frozen one, fitted on the warm-start rows,
        scored higher as the per-user table's base than the whole ranker: trainer/models/config.py).
        The deep part then learns what the linear part leaves, and the wide rate drops to
        `wide_lr_after_fit`, so the fit is not undone by the deep part's noisy steps."""
        out = {}
        batch = batch.to(self.device)
        for n, m in self.models.items():
            if m.wide_dense is None:
                continue
            m.fit_stats_scale(batch.stats)
            with torch.no_grad():
                xs = m.dense_inputs(batch)  # (B, F)
            y, lin = batch.label, m.wide_dense
            opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.binary_cross_entropy_with_logits(lin(xs).squeeze(-1), y) + l2 * lin.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)  # returns the loss before the fit: report the one after it
            with torch.no_grad():
                out[n] = float(F.binary_cross_entropy_with_logits(lin(xs).squeeze(-1), y))
            groups = self.optimizers[n].param_groups
            if len(groups) > 1:  # [rest, wide] (Learner._optimizer)
                groups[1]["lr"] = self.lcfg.wide_lr_after_fit
        return out

    def train(self, batch: Batch) -> dict[str, dict[str, float]]:
        """Optimizer steps of every model on `batch`; mean loss parts per model."""
        return {n: self.train_model(n, batch) for n in self.names}

    def train_model(self, name: str, batch: Batch) -> dict[str, float]:
        """Optimizer steps of model `name` on `batch` (every `minibatch` rows); its mean loss parts."""
        lc, m, opt = self.lcfg, self.models[name], self.optimizers[name]
        t = time.perf_counter()
        m.train()
        acc: dict[str, float] = {}
        k = 0
        view = batch.select(m.inputs).to(self.device)
        m.fit_stats_scale(view.stats)
        for _ in range(lc.epochs_per_batch):
            for s in range(0, len(batch), lc.minibatch):
                loss, _, p = m.loss(view.slice(slice(s, s + lc.minibatch)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if lc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), lc.grad_clip)
                opt.step()
                for key, v in p.items():
                    acc[key] = acc.get(key, 0.0) + v
                k += 1
        self.busy_s[name] += time.perf_counter() - t
        self.rows_trained[name] += len(batch) * lc.epochs_per_batch
        return {key: v / max(k, 1) for key, v in acc.items()}
