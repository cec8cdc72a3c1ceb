"""Shared pieces of the streams tests: small MovieLens slice, tiny real tokenizer, broker, Feast repo.

Import these fixtures into a test module (`from tests.streams_fixtures import *`); they are
module-local on purpose (tests/conftest.py belongs to nobody in particular).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "ml-latest-small"
N_ITEMS = 200
N_INTERACTIONS = 2000


def small_slice(n_interactions: int = N_INTERACTIONS, max_items: int = N_ITEMS):
    """The first interactions (event-time order) restricted to the first `max_items` items seen."""
    from streams.movielens import load_movielens

    ds = load_movielens(DATA)
    keep: dict[int, object] = {}
    its = []
    for it in ds.interactions:
        if it.item_id not in keep and len(keep) < max_items:
            keep[it.item_id] = ds.items[it.item_id]
        if it.item_id in keep:
            its.append(it)
        if len(its) >= n_interactions:
            break
    return keep, its


def fit_tiny_tokenizer(out_dir: Path, items: dict, interactions: list) -> Path:
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    cfg = TokenizerConfig(levels=3, codebook_size=8, mem_vocab_size=64, kmeans_niter=10, align=False,
                          threads=2, seed=0)
    tok = HybridTokenizer.fit(list(items.values()), interactions, cfg, progress=False)
    tok.save(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def ml_slice():
    return small_slice()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, ml_slice):
    items, its = ml_slice
    return fit_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "artifact", items, its)


@pytest.fixture()
def broker():
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture()
def kafka_config(broker):
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig

    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
    create_topics(cfg)
    return cfg


@pytest.fixture()
def feast_repo(tmp_path):
    from streams.feature_repo_tools import materialize_repo

    return materialize_repo(tmp_path / "repo")


def run(coro):
    return asyncio.run(coro)
