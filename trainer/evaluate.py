"""`trm eval`: score a time window with a checkpoint's models on point-in-time Feast features.

Rows come from the labelled events of the window; features from the offline store as of each
event (the same PIT join the trainer uses), so an evaluation never sees the future either.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .checkpoint import load_checkpoint, read_pointer, read_state
from .featurizer import Featurizer
from .metrics import plot_results, results_table, summarize
from .models import RankerConfig, build_model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a directory with a LATEST pointer (checkpoints or published models)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    latest = read_pointer(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a directory with a LATEST pointer")
    return latest


def load_models(checkpoint: str | Path) -> tuple[dict[str, torch.nn.Module], RankerConfig, dict]:
    """The checkpoint's models (eval mode), their config and train state (verified)."""
    path = resolve_checkpoint(checkpoint)
    st = read_state(path)
    cfg = RankerConfig.from_dict(st.extra["config"])
    models = {n: build_model(n, cfg) for n in st.extra["models"]}
    load_checkpoint(path, models, restore_rng=False)
    for m in models.values():
        m.eval()
    return models, cfg, {"step": st.step, "events_seen": st.events_seen, "tokenizer_version": st.tokenizer_version,
                         "path": str(path), **st.extra}


@torch.no_grad()
def score(models: dict[str, torch.nn.Module], joined: pd.DataFrame, featurizer: Featurizer,
          batch_size: int = 4096) -> pd.DataFrame:
    """Joined rows + one `score_<model>` column per model (per-user weights as the checkpoint holds them:
    an evaluation scores, it does not learn)."""
    out = joined[["user_id", "item_id", "label", "event_time", "created_at"]].copy()
    cols: dict[str, list[np.ndarray]] = {n: [] for n in models}
    known = []
    for s in range(0, len(joined), batch_size):
        batch, _ = featurizer(joined.iloc[s:s + batch_size])
        known.append(batch.known.numpy())
        for n, m in models.items():
            cols[n].append(torch.sigmoid(m.personal_logit(batch.select(m.inputs), batch.user_id)).numpy())
    out["known"] = np.concatenate(known) if known else np.zeros(0, bool)
    for n, parts in cols.items():
        out[f"score_{n}"] = np.concatenate(parts) if parts else np.zeros(0)
    return out


def evaluate_frame(scored: pd.DataFrame, names: Sequence[str], fit_cutoff: int | None = None) -> dict[str, dict]:
    return {n: summarize(scored, f"score_{n}", fit_cutoff) for n in names}


def evaluate(repo: str | Path, checkpoint: str | Path, events: pd.DataFrame, fit_cutoff: int | None = None,
             out_dir: str | Path | None = None, batch_size: int = 4096, title: str | None = None) -> dict[str, dict]:
    """Metrics of every model in `checkpoint` on `events` (user_id, item_id, label, event_time).

    With `out_dir`: writes metrics.json, scores.parquet and auc_by_age.png there.
    """
    from .pit_join import FeastJoiner, join_in_slices

    models, cfg, info = load_models(checkpoint)
    need_ngrams = any(n in ("two_gram", "prefix_ngram") for n in models)
    featurizer = Featurizer.for_config(cfg, info["tokenizer_version"], ngrams=need_ngrams)
    joined = join_in_slices(FeastJoiner(str(repo)), events)
    scored = score(models, joined, featurizer, batch_size)
    cutoff = fit_cutoff if fit_cutoff is not None else info.get("tokenizer_fit_cutoff")
    results = evaluate_frame(scored, list(models), cutoff)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"checkpoint": info["path"], "step": info["step"],
                                                      "fit_cutoff": cutoff, "results": results}, indent=1))
        scored.to_parquet(out / "scores.parquet")
        plot_results(results, str(out / "auc_by_age.png"), title or f"AUC by item age (step {info['step']})")
    return results


def window_events(data_dir: str | Path, start: float | None, end: float | None) -> pd.DataFrame:
    """Labelled MovieLens events with start <= event_time < end; values in [0, 1] are time quantiles."""
    from streams.movielens import load_movielens

    ds = load_movielens(data_dir)
    to_t = lambda v, default: default if v is None else (ds.time_quantile(v) if 0 <= v <= 1 else int(v))  # noqa: E731
    lo, hi = to_t(start, -np.inf), to_t(end, np.inf)
    rows = [(i.user_id, i.item_id, i.label, i.event_time) for i in ds.interactions if lo <= i.event_time < hi]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label", "event_time"])


def print_results(results: dict[str, dict], title: str = "Ranking quality") -> None:
    from rich.console import Console

    Console().print(results_table(results, title))
