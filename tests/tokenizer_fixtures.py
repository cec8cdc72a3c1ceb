"""Shared pieces of the tokenizer tests: a real MovieLens subset, its cached encoder embeddings, and
one tokenizer fitted on it.

Fitting is the slow part (encoder pass + alignment), so it happens once per test process: the
builders are memoised here and the pytest fixtures only wrap them, which keeps the cache shared
even when several test modules import the fixtures.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "ml-latest-small"
N_ITEMS = 1500  # the first items by id (mostly 1990s films, the densest part of the log)
THREADS = 2


def subset_config():
    from tokenizer.hybrid import TokenizerConfig

    # K=32: 1500 items leave ~47 per first-level code; mem budget = alphabet (96) + merges
    return TokenizerConfig(levels=3, codebook_size=32, mem_vocab_size=1024, kmeans_niter=20,
                           align_epochs=5, align_random_negatives=256, threads=THREADS, seed=0)


@lru_cache(maxsize=1)
def dataset():
    from streams.movielens import load_movielens

    return load_movielens(DATA)


@lru_cache(maxsize=1)
def subset():
    """(items sorted by id, their interactions, held-back items never seen by the fit)."""
    ds = dataset()
    ids = sorted(ds.items)
    keep = ids[:N_ITEMS]
    keep_set = set(keep)
    items = [ds.items[i] for i in keep]
    inter = [it for it in ds.interactions if it.item_id in keep_set]
    unseen = [ds.items[i] for i in ids[N_ITEMS:N_ITEMS + 50]]
    return items, inter, unseen


@lru_cache(maxsize=1)
def encoder():
    from tokenizer.encoder import ContentEncoder

    return ContentEncoder(threads=THREADS)


@lru_cache(maxsize=1)
def embeddings() -> np.ndarray:
    items, _, _ = subset()
    emb = encoder().encode([it.text() for it in items])
    emb.setflags(write=False)
    return emb


@lru_cache(maxsize=1)
def fitted():
    from tokenizer.hybrid import HybridTokenizer

    items, inter, _ = subset()
    return HybridTokenizer.fit(items, inter, subset_config(), progress=False, embeddings=embeddings(),
                               encoder=encoder())


@pytest.fixture(scope="session")
def tok_subset():
    return subset()


@pytest.fixture(scope="session")
def tok_embeddings():
    return embeddings()


@pytest.fixture(scope="session")
def fitted_tokenizer():
    return fitted()


@pytest.fixture(scope="session")
def saved_artifact(tmp_path_factory, fitted_tokenizer):
    """A pristine saved artifact; tests that tamper must copy it first (see `artifact_copy`)."""
    return fitted_tokenizer.save(tmp_path_factory.mktemp("tokenizer") / "artifact")


@pytest.fixture()
def artifact_copy(tmp_path, saved_artifact):
    import shutil

    dst = tmp_path / "artifact"
    shutil.copytree(saved_artifact, dst)
    return dst


def rewrite_artifact_file(artifact: Path, name: str, data: bytes) -> None:
    """Replace a file of an artifact *and* fix up its manifest (checksum and version): only the
    semantic checks (geometry, encoder) can catch the change then."""
    import hashlib
    import json

    from tokenizer.artifact import version_of

    (artifact / name).write_bytes(data)
    mpath = artifact / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    manifest["version"] = version_of(manifest["files"])
    mpath.write_text(json.dumps(manifest))
