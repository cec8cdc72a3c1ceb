"""Write the legacy fixtures of tests/test_legacy_formats.py with the code *being run*, not this checkout.

Run it with the pre-refactor tree first on the path (see README.md next to this file):

    cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/old/tests /work/main/.venv/bin/python \
        /work/main/tests/data/legacy/make_fixtures.py /work/main/tests/data/legacy

It only uses APIs that both the old and the new code have (HybridTokenizer.fit/save, Learner,
save_checkpoint, ModelPublisher), so rerunning it with a later tree writes that tree's format.
Everything is seeded; tiny sizes keep the committed files small.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

N_ITEMS, N_QUERIES, DIM = 64, 12, 384
NAMES = ["trm"]


@dataclass(frozen=True)
class Item:  # what HybridTokenizer.fit reads of an item
    item_id: int

    def text(self) -> str:
        return f"item {self.item_id}"


@dataclass(frozen=True)
class Interaction:  # ...and of an interaction
    user_id: int
    item_id: int
    label: int
    event_time: int


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_tokenizer(out: Path) -> None:
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    rng = np.random.default_rng(0)
    emb = unit_rows(rng, N_ITEMS)
    items = [Item(i) for i in range(1, N_ITEMS + 1)]
    # 16 users each liking a run of 8 neighbouring items: recurring co-likes, so alignment trains
    inter = [Interaction(u, 1 + (u * 3 + k) % N_ITEMS, 1, 1_600_000_000 + 10 * (u * 8 + k))
             for u in range(16) for k in range(8)]
    cfg = TokenizerConfig(levels=2, codebook_size=4, mem_vocab_size=16, bpe_min_frequency=1, kmeans_niter=5,
                          align_hidden=8, align_epochs=1, align_batch_size=32, align_random_negatives=16,
                          threads=1, seed=0)
    tok = HybridTokenizer.fit(items, inter, cfg, progress=False, embeddings=emb)
    art = out / "tokenizer"
    shutil.rmtree(art, ignore_errors=True)
    tok.save(art)
    queries = np.concatenate([emb[:N_QUERIES // 2], unit_rows(rng, N_QUERIES - N_QUERIES // 2)])
    np.save(out / "tokenizer_queries.npy", queries, allow_pickle=False)
    toks = tok.encode_embeddings(queries)
    expected = {"version": tok.version, "gen_tokens": [t.gen_tokens for t in toks],
                "mem_tokens": [t.mem_tokens for t in toks]}
    (out / "tokenizer_expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def write_checkpoint(out: Path) -> None:
    from trainer_fixtures import TOKENIZER_VERSION, featurizer, joined_frame, small_config

    from trainer.checkpoint import ModelPublisher, TrainState, save_checkpoint
    from trainer.learner import Learner, LearnerConfig

    cfg = small_config(d_model=8, n_heads=2, hist_len=4, max_wide=2, wide_buckets=32, id_buckets=64)
    learner = Learner(NAMES, cfg, LearnerConfig(minibatch=16, seed=0))
    learner.train(featurizer(cfg)(joined_frame(32, seed=0))[0])  # optimizer moments exist
    state = TrainState(step=2, offsets={"interactions:0": 32}, tokenizer_version=TOKENIZER_VERSION, events_seen=32,
                       extra={"config": cfg.to_dict(), "models": NAMES})
    ck, models = out / "checkpoints", out / "models"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.rmtree(models, ignore_errors=True)
    path = save_checkpoint(ck, learner.models, learner.optimizers, state, keep=1)
    ModelPublisher(models, every=1).maybe_publish(path, state.step)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    write_tokenizer(out)
    write_checkpoint(out)
