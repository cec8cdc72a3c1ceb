"""Carry a ranker across a tokenizer refresh: remap its token-indexed rows by the refit's lineage.

A refit (tokenizer/refit.py) names its codes after the old ones wherever a cluster persisted, and
seals in the new artifact's lineage.json, for every new id, the old id to start from:
  - gen id (level l, code c): the nearest old centroid of level l (itself where the cluster kept
    its id) -> row c of every GenTokenEmbedding (the deep side, the history, the tied NTP head)
    is copied from that old row;
  - mem id: a new piece starts from its longest prefix the old BPE had, a base symbol follows its
    gen code -> the rows of the mem-token wide table (hashed) are copied the same way.
Everything else is kept as trained: the dense weights, the backbone, the per-user table (its keys
are hashes of ids that kept their meaning), the "unknown" rows. Adam's moment estimates follow
their rows, so a copied row keeps the step sizes its source had.

Only a direct parent is connected: a checkpoint two refits back, or one no lineage names, is
refused with the fix (migrate through the intermediate artifact, or start a new checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import TrainerError
from .models.embedding import GenTokenEmbedding, HashedBagEmbedding, hash_ids


class MigrationError(TrainerError, RuntimeError):
    """No lineage connects the checkpoint's tokenizer to the one the features use now."""


@dataclass(frozen=True)
class TokenMap:
    parent: str  # tokenizer version the rows were trained on
    version: str  # tokenizer version they are remapped to
    gen_src: np.ndarray  # [L*K] int64: the old gen row each new gen id starts from
    mem_src: dict[int, int]  # new mem id -> old mem id, for ids whose meaning changed

    @property
    def gen_moved(self) -> int:
        return int((self.gen_src != np.arange(len(self.gen_src))).sum())


def token_map(lineage: dict | None, version: str, checkpoint_version: str | None,
              num_levels: int, codebook_size: int) -> TokenMap:
    """The map from `checkpoint_version`'s ids to `version`'s, or MigrationError naming the fix."""
    if lineage is None:
        raise MigrationError(
            f"the checkpoint was trained on tokenizer {checkpoint_version}, the features now use {version}, "
            f"a fresh fit with no lineage: its ids mean something else. Refit from the old artifact "
            f"(`trm tokenizer refit --from <artifact of {checkpoint_version}>`) to carry the ranker over, "
            "or start a new --checkpoint-dir")
    if lineage.get("parent") != checkpoint_version:
        raise MigrationError(
            f"the checkpoint was trained on tokenizer {checkpoint_version}, but {version} was refitted from "
            f"{lineage.get('parent')}: no mapping connects them. Migrate through {lineage.get('parent')} first "
            "(train on it once), or start a new --checkpoint-dir")
    L, K = int(lineage["levels"]), int(lineage["codebook_size"])
    if (L, K) != (num_levels, codebook_size):
        raise MigrationError(f"lineage of {version} maps {L}x{K} codes, the ranker has {num_levels}x{codebook_size}")
    nearest = np.asarray(lineage["gen"]["nearest_old"], dtype=np.int64)  # (L, K) level-local
    gen_src = (nearest + np.arange(L)[:, None] * K).reshape(-1)  # level-offset
    mem_src = {int(k): int(v) for k, v in lineage.get("mem_init", {}).items()}
    return TokenMap(str(checkpoint_version), version, gen_src, mem_src)


def _copy_rows(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer | None,
               dst: torch.Tensor, src: torch.Tensor) -> None:
    """param[dst] = param[src] (from a snapshot), and the same for its Adam moments."""
    tensors = [param.data]
    if optimizer is not None:
        state = optimizer.state.get(param, {})
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
    for t in tensors:
        t[dst.to(t.device)] = t[src.to(t.device)].clone()


@torch.no_grad()
def migrate_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tmap: TokenMap) -> dict:
    """Remap one model's token rows in place; returns how many rows of each kind were copied."""
    out = {"gen_rows": 0, "mem_rows": 0}
    n_gen = len(tmap.gen_src)
    moved = np.nonzero(tmap.gen_src != np.arange(n_gen))[0]
    for module in model.modules():
        if isinstance(module, GenTokenEmbedding) and len(moved):
            dst = torch.as_tensor(moved)
            _copy_rows(module.weight_table.weight, optimizer, dst, torch.as_tensor(tmap.gen_src[moved]))
            out["gen_rows"] += len(moved)
    for name in getattr(model, "mem_tables", ()):
        bag: HashedBagEmbedding = model.get_submodule(name)
        if not tmap.mem_src:
            continue
        new = torch.as_tensor(sorted(tmap.mem_src), dtype=torch.int64)
        old = torch.as_tensor([tmap.mem_src[int(i)] for i in new], dtype=torch.int64)
        _copy_rows(bag.table.weight, optimizer, hash_ids(new, bag.buckets, bag.seed),
                   hash_ids(old, bag.buckets, bag.seed))
        out["mem_rows"] += len(new)
    return out


def migrate(models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
            tmap: TokenMap) -> dict[str, dict]:
    """Remap every model of a trainer (in place); {model: rows copied}."""
    return {name: migrate_model(m, optimizers.get(name), tmap) for name, m in models.items()}
