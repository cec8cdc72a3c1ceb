"""Shared helpers for the trainer tests: a small structured event stream and its Feast features.

The feature rows follow docs/contracts.md (a row stamped t holds the state *after* the event at
t) and are written through streams' FeastSink into a real Feast repo materialised in a tmp dir.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from trainer.featurizer import Featurizer
from trainer.models import RankerConfig

L, K = 3, 16
TOKENIZER_VERSION = "test-tokenizer-v1"
T0 = 1_600_000_000  # epoch seconds


def small_config(**kw) -> RankerConfig:
    base = dict(num_levels=L, codebook_size=K, d_model=32, n_blocks=1, hist_len=8, max_wide=4,
                wide_buckets=512, id_buckets=4096, n_heads=4, linear_bits=14)
    base.update(kw)
    return RankerConfig(**base)


def item_tokens(item_id: int) -> tuple[list[int], list[int]]:
    """Deterministic level-offset gen-tokens and two mem-tokens for an item."""
    rng = np.random.default_rng(item_id)
    gen = [int(rng.integers(K)) + l * K for l in range(L)]
    return gen, [gen[0] * 31 + gen[1], gen[1] * 31 + gen[2]]


def coarse_tokens(item_id: int) -> list[int]:
    """The item's first gen-token and two other level-1 codes (nearest first, as the tokenizer writes them)."""
    g0 = item_tokens(item_id)[0][0]
    return [g0, (g0 + 1 + item_id % 3) % K, (g0 + 5) % K]


GENRES = ("Action", "Comedy", "Drama", "Romance", "Sci-Fi", "Thriller", "Animation")


def lexical_tokens(item_id: int) -> list[int]:
    """The item's published categories (one to three genres) and title ("Film <id> (<year>)", every
    fourth without a year) as the item agent writes them."""
    from tokenizer.lexical import lexical_tokens as tokens

    year = f" ({1950 + 7 * item_id % 70})" if item_id % 4 else ""
    return tokens([GENRES[(item_id * k) % len(GENRES)] for k in range(1, 2 + item_id % 3)], f"Film {item_id}{year}")


@dataclass(frozen=True)
class Event:
    user_id: int
    item_id: int
    label: int
    event_time: int


def event_stream(n: int = 600, n_users: int = 30, n_items: int = 60, seed: int = 0) -> list[Event]:
    """Items whose first gen-token is in the lower half are liked (80 % vs 20 %): learnable from tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u, it = int(rng.integers(1, n_users + 1)), int(rng.integers(1, n_items + 1))
        likes = item_tokens(it)[0][0] < K // 2
        label = int(rng.random() < (0.8 if likes else 0.2))
        out.append(Event(u, it, label, T0 + 10 * i))
    return out


def feature_rows(events: list[Event], hist_len: int = 8) -> dict[str, list[dict]]:
    """item_tokens (at the item's creation), user_history and item_stats rows after every event."""
    rows: dict[str, list[dict]] = {"item_tokens": [], "user_history": [], "item_stats": []}
    first: dict[int, int] = {}
    for e in events:
        first.setdefault(e.item_id, e.event_time)
    for it, t in first.items():
        gen, mem = item_tokens(it)
        rows["item_tokens"].append(dict(item_id=it, gen_tokens=gen, mem_tokens=mem, coarse_tokens=coarse_tokens(it),
                                        lexical_tokens=lexical_tokens(it), tokenizer_version=TOKENIZER_VERSION,
                                        created_at=t - 60, retired=False, event_timestamp=t - 60))
    hist: dict[int, list[int]] = {}
    ucount: dict[int, list[int]] = {}
    icount: dict[int, list[int]] = {}
    for e in events:
        if e.label:
            hist.setdefault(e.user_id, []).append(e.item_id)
        uc = ucount.setdefault(e.user_id, [0, 0])
        uc[0] += 1
        uc[1] += e.label
        ic = icount.setdefault(e.item_id, [0, 0])
        ic[0] += 1
        ic[1] += e.label
        h = hist.get(e.user_id, [])[-hist_len:]
        rows["user_history"].append(dict(user_id=e.user_id, hist_gen_tokens=[g for it in h for g in item_tokens(it)[0]],
                                         hist_item_ids=list(h), user_n_events=uc[0], user_n_positives=uc[1],
                                         event_timestamp=e.event_time))
        rows["item_stats"].append(dict(item_id=e.item_id, item_n_interactions=ic[0], item_n_positives=ic[1],
                                       event_timestamp=e.event_time))
    return rows


def make_repo(tmp_path, events: list[Event]):
    """A real Feast repo (the project's feature_repo/) in tmp, with the stream's features written offline."""
    from streams.feast_sink import FeastSink
    from streams.feature_repo_tools import materialize_repo

    repo = materialize_repo(tmp_path / "feature_repo")
    sink = FeastSink(repo)
    for view, rows in feature_rows(events).items():
        sink.write(view, rows, online=False)
    return repo


def joined_frame(n: int = 64, seed: int = 0, null_every: int = 5) -> pd.DataFrame:
    """A frame shaped like the PIT join's output, every `null_every`-th item without features."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        it = int(rng.integers(1, 100))
        gen, mem = item_tokens(it)
        missing = null_every and i % null_every == 0
        h = [int(x) for x in rng.integers(1, 100, size=int(rng.integers(0, 6)))]
        labs = [int(x) for x in rng.integers(0, 2, size=len(h))]
        rows.append(dict(
            user_id=int(rng.integers(1, 20)), item_id=it, label=int(rng.integers(2)), event_time=T0 + i,
            gen_tokens=None if missing else np.array(gen), mem_tokens=None if missing else np.array(mem),
            coarse_tokens=None if missing else np.array(coarse_tokens(it)),
            lexical_tokens=None if missing else np.array(lexical_tokens(it)),
            tokenizer_version=None if missing else TOKENIZER_VERSION, created_at=np.nan if missing else T0 - 100,
            retired=None if missing else False,
            hist_gen_tokens=np.array([g for x in h for g in item_tokens(x)[0]]) if h else None,
            hist_item_ids=np.array(h) if h else None,
            user_n_events=float(len(h)) if h else np.nan, user_n_positives=float(len(h)) if h else np.nan,
            item_n_interactions=np.nan if missing else 3.0, item_n_positives=np.nan if missing else 1.0,
            recent_item_ids=np.array(h) if h else None,
            recent_gen_tokens=np.array([g for x in h for g in item_tokens(x)[0]]) if h else None,
            recent_labels=np.array(labs) if h else None, last_event_time=float(T0 + i - 30) if h else np.nan))
    return pd.DataFrame(rows)


def featurizer(cfg: RankerConfig) -> Featurizer:
    return Featurizer.for_config(cfg, TOKENIZER_VERSION)


def publish(cfg, events):
    """Publish `events` as InteractionEvents to the interactions topic (acknowledged)."""
    from streams.contract.events import InteractionEvent
    from streams.publisher import publish_kind

    evs = [InteractionEvent(f"r{i}", e.user_id, e.item_id, e.label, e.event_time) for i, e in enumerate(events)]
    publish_kind(cfg, "interactions", evs, progress=False)


def assert_checkpoint_carries(learner, cfg: RankerConfig, batch, tmp_path, buffer: str) -> None:
    """Save `learner`'s models and load them into fresh ones: `buffer` (a state-dict key, e.g.
    "user_weights.w") comes back equal, and `personal_logit` (serving, `trm eval`) scores the same."""
    import torch

    from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from trainer.models import build_model

    path = save_checkpoint(tmp_path, learner.models, learner.optimizers, TrainState(step=1))
    fresh = {n: build_model(n, cfg) for n in learner.names}
    load_checkpoint(path, fresh, restore_rng=False)
    for n in learner.names:
        assert torch.equal(fresh[n].state_dict()[buffer], learner.models[n].state_dict()[buffer])
        m = fresh[n].eval()
        with torch.no_grad():
            want = learner.models[n].eval().personal_logit(batch.select(m.inputs), batch.user_id)
            assert torch.allclose(m.personal_logit(batch.select(m.inputs), batch.user_id), want)
