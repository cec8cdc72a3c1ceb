"""bench/scale_bench.py's synthetic stream has the properties its figures rely on."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from scale_bench import N_TOPICS, generate, item_texts  # noqa: E402


def test_stream_is_ordered_causal_skewed_and_learnable():
    d = generate(20_000, 2_000, seed=1)
    assert len(d["t"]) == 20_000 and (np.diff(d["t"]) >= 0).all()  # event-time order
    assert (d["created"][d["item"] - 1] <= d["t"]).all()  # no event on an item before it exists
    counts = np.bincount(d["item"])
    top = np.sort(counts)[::-1]
    assert top[:20].sum() > 5 * top[-200:].sum()  # a popular head (Zipf), a long tail
    same_user = (d["user"][1:] == d["user"][:-1]).mean()
    assert same_user > 0.05  # sessions: consecutive events of one user, far above 1 / users
    assert 0.3 < d["label"].mean() < 0.6
    texts = item_texts(d["topic"][:50])
    assert len(set(texts)) == 50 and all(str(int(tp)) in t for tp, t in zip(d["topic"][:50], texts))
    assert d["topic"].max() < N_TOPICS


def test_same_seed_same_stream():
    a, b = generate(5_000, 500, seed=3), generate(5_000, 500, seed=3)
    assert all((a[k] == b[k]).all() for k in a)
