"""Ranking metrics (scikit-learn), item-age buckets, and the table/plot that report them.

GAUC is per-user AUC averaged with weights = the user's number of rows, over users that have
both classes: the paper's QAUC where no query exists.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

DAY = 86_400
AGE_BUCKETS = ("<1d", "1-7d", "7-30d", ">30d")
UNSEEN = "unseen by tokenizer"  # item created after the tokenizer's fit cutoff
UNKNOWN_AGE = "no item features"


def auc(y: np.ndarray, p: np.ndarray) -> float:
    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    return float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])) if len(y) else math.nan


def gauc(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> float:
    df = pd.DataFrame({"y": np.asarray(y), "p": np.asarray(p), "u": np.asarray(users)})
    num = den = 0.0
    for _, g in df.groupby("u", sort=False):
        if 0 < g["y"].sum() < len(g):
            num += len(g) * roc_auc_score(g["y"], g["p"])
            den += len(g)
    return num / den if den else math.nan


def age_bucket(event_time: np.ndarray, created_at: np.ndarray) -> np.ndarray:
    """Item age at event time -> bucket label; NaN created_at (no item features) -> UNKNOWN_AGE."""
    age = (np.asarray(event_time, dtype=float) - np.asarray(created_at, dtype=float)) / DAY
    out = np.full(age.shape, UNKNOWN_AGE, dtype=object)
    edges = [(-np.inf, 1), (1, 7), (7, 30), (30, np.inf)]
    for name, (lo, hi) in zip(AGE_BUCKETS, edges):
        out[(age >= lo) & (age < hi)] = name
    return out


def summarize(df: pd.DataFrame, score_col: str, fit_cutoff: int | None = None) -> dict:
    """Metrics of one model's scores on rows with label, user_id, event_time, created_at.

    Returns {"n", "auc", "gauc", "logloss", "by_age": {bucket: {"n", "auc"}}}; with `fit_cutoff`
    (epoch s) an extra bucket holds items created after the tokenizer was fitted.
    """
    y, p = df["label"].to_numpy(int), df[score_col].to_numpy(float)
    out = {"n": len(df), "pos_rate": float(y.mean()) if len(y) else math.nan,
           "auc": auc(y, p), "gauc": gauc(y, p, df["user_id"].to_numpy()), "logloss": logloss(y, p), "by_age": {}}
    created = pd.to_numeric(df["created_at"], errors="coerce").to_numpy(float)
    buckets = age_bucket(df["event_time"].to_numpy(float), created)
    groups = {b: buckets == b for b in AGE_BUCKETS + (UNKNOWN_AGE,)}
    if fit_cutoff is not None:
        groups[UNSEEN] = created >= fit_cutoff
    for name, m in groups.items():
        if m.any():
            out["by_age"][name] = {"n": int(m.sum()), "auc": auc(y[m], p[m])}
    return out


def _fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def results_table(results: dict[str, dict], title: str = "Ranking quality"):
    """A rich Table: one row per model, overall metrics then AUC per item-age bucket."""
    from rich.table import Table

    buckets = [b for b in AGE_BUCKETS + (UNSEEN, UNKNOWN_AGE) if any(b in r["by_age"] for r in results.values())]
    t = Table(title=title)
    for c in ["model", "n", "AUC", "GAUC", "logloss"] + [f"AUC {b}" for b in buckets]:
        t.add_column(c, justify="left" if c == "model" else "right")
    for name, r in results.items():
        cells = [name, str(r["n"]), _fmt(r["auc"]), _fmt(r["gauc"]), _fmt(r["logloss"])]
        for b in buckets:
            cell = r["by_age"].get(b)
            cells.append(f"{_fmt(cell['auc'])} ({cell['n']})" if cell else "—")
        t.add_row(*cells)
    return t


def plot_results(results: dict[str, dict], path: str, title: str = "AUC by item age at event time") -> str:
    """Grouped bars: AUC per item-age bucket per model (and overall), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = ["overall"] + [b for b in AGE_BUCKETS + (UNSEEN,) if any(b in r["by_age"] for r in results.values())]
    fig, ax = plt.subplots(figsize=(1.6 * len(buckets) + 3, 4))
    width = 0.8 / max(len(results), 1)
    for i, (name, r) in enumerate(results.items()):
        vals = [r["auc"]] + [r["by_age"].get(b, {}).get("auc", math.nan) for b in buckets[1:]]
        ax.bar(np.arange(len(buckets)) + i * width, vals, width, label=name)
    ns = [next(iter(results.values()))["n"]] + [max(r["by_age"].get(b, {}).get("n", 0) for r in results.values())
                                              for b in buckets[1:]]
    ax.set_xticks(np.arange(len(buckets)) + width * (len(results) - 1) / 2,
                  [f"{b}\n(n={n})" for b, n in zip(buckets, ns)])
    finite = [v for r in results.values() for v in [r["auc"]] + [c["auc"] for c in r["by_age"].values()]
              if not math.isnan(v)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
    ax.set_ylabel("AUC")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(results), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(log_path: str, path: str, window: int = 20) -> str:
    """Prequential training curve from the trainer's JSONL log: rolling AUC per model vs events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_json(log_path, lines=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in df.groupby("model", sort=False):
        ax.plot(g["events_seen"], g["auc"].rolling(window, min_periods=1).mean(), label=name)
    ax.set_xlabel("events seen")
    ax.set_ylabel(f"prequential AUC (rolling {window} batches)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
