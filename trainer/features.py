"""Request-time features: what a ranker knows of a (user, candidate item, time) beyond the tokens.

Every value is a pure function of the point-in-time joined Feast rows of the event (stamped
strictly before its second, trainer/pit_join.py), the candidate's own tokens and the event time
itself. So the same function serves offline training and online ranking, and no value can see
the event's own label or any event of its second.

Why these: on this stream a new user is read from their first few labels (94 % of consecutive
events share a user, most users evaluated after the cutoff are new there), and the strongest
signals a peer learner finds are the user's recent positive rate, the user's rate on the item's
category, and the item's rate (../shared/quality/PEERS.md). Gen-token prefixes are this system's
own category hierarchy, so the user's affinity to the candidate's prefixes stands in for genres.

Rates are smoothed toward 1/2 ((pos + 1) / (n + 2)) and given as logits, so a learner that adds
them (the wide part) starts from the formula over user and item rates.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

COUNT_COLUMNS = ("user_n_events", "user_n_positives", "item_n_interactions", "item_n_positives")
RECENT_WINDOWS = (1, 3, 5, 10, 20)  # the user's last k labelled events

DENSE_FEATURES = (
    # 0-3: log1p of the counts (the first four: what models before these features read)
    *(f"log1p_{c}" for c in COUNT_COLUMNS),
    "user_rate_logit", "item_rate_logit", "new_user", "new_item",
    *(f"last{k}_rate_logit" for k in RECENT_WINDOWS),
    "log1p_recent_n", "log1p_since_last_event", "log1p_item_age_h",
    "prefix1_rate_logit", "log1p_prefix1_n", "prefix2_rate_logit", "log1p_prefix2_n",
    "hist_prefix1_share", "hist_prefix2_share",
)
N_DENSE = len(DENSE_FEATURES)
IDX = {name: j for j, name in enumerate(DENSE_FEATURES)}


SECONDS_PER_YEAR = 365.2425 * 86400
RELEASE_AGE_YEARS = (1, 2, 4, 8, 16, 32)  # bucket edges of an item's age since its release year began


def era_keys(lexical: np.ndarray, event_time: np.ndarray | None) -> np.ndarray:
    """(B, 2) int64: the item's decade and its release-age bucket at the event; -1 where its lexical
    tokens hold no release year (tokenizer/lexical.py), or (the bucket) where the event time is unknown.

    lexical: (B, T) the item's lexical tokens, -1 pads; event_time: (B,) epoch s. The bucket is
    [0, 1), [1, 2), [2, 4), ... [32, inf) years since about the start of the release year (years of
    365.2425 days from 1970; a rating dated before it counts as 0). A function of the item's title as
    published before the event's second (the PIT-joined row) and of the event's own time only: it
    has no label nor any other event among its inputs (tests/test_trainer_pit.py,
    tests/test_trainer_features.py)."""
    from tokenizer.lexical import YEAR_OFFSET, is_year

    lex = np.asarray(lexical, dtype=np.int64)  # (B, T)
    years = is_year(lex)
    year = np.where(years.any(1), np.where(years, lex - YEAR_OFFSET, 0).max(1), -1)  # (B,)
    out = np.full((len(lex), 2), -1, dtype=np.int64)
    has = year > 0
    out[has, 0] = year[has] // 10
    if event_time is not None:
        age = 1970 + np.asarray(event_time, dtype=np.float64) / SECONDS_PER_YEAR - year
        out[has, 1] = np.digitize(age[has], RELEASE_AGE_YEARS)
    return out


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    """A numeric column as float64; missing column or null -> NaN."""
    if col not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)


def _logit_rate(pos, n):
    """logit of (pos + 1) / (n + 2); pos is capped at n (inconsistent rows never give NaN)."""
    pos = np.minimum(pos, n)
    return np.log((pos + 1.0) / (n - pos + 1.0))


def dense_features(df: pd.DataFrame, gen: np.ndarray, known: np.ndarray, recent_gen: np.ndarray,
                   recent_labels: np.ndarray, hist_gen: np.ndarray) -> np.ndarray:
    """(B, N_DENSE) float32 in DENSE_FEATURES order.

    df: joined rows (event_time + the Feast features; missing ones count as "nothing known");
    gen: (B, L) the candidate's level-offset gen-tokens, valid where `known`; the user's events as
    the featurizer pads them: recent_gen (B, R, L) and recent_labels (B, R) right-aligned with -1
    labels as padding, hist_gen (B, H, L) the positives, -1 padding.
    """
    n = len(df)
    out = np.zeros((n, N_DENSE), dtype=np.float64)
    counts = [np.nan_to_num(_num(df, c), nan=0.0).clip(min=0) for c in COUNT_COLUMNS]
    un, upos, itn, ipos = counts
    for j, c in enumerate(counts):
        out[:, j] = np.log1p(c)
    out[:, IDX["user_rate_logit"]] = _logit_rate(upos, un)
    out[:, IDX["item_rate_logit"]] = _logit_rate(ipos, itn)
    out[:, IDX["new_user"]] = un == 0
    out[:, IDX["new_item"]] = itn == 0

    t = _num(df, "event_time")
    last = _num(df, "last_event_time")
    created = _num(df, "created_at")
    since = np.where(np.isnan(last), 0.0, np.clip(t - last, 0, None))
    age_h = np.where(np.isnan(created), 0.0, np.clip(t - created, 0, None) / 3600.0)
    out[:, IDX["log1p_since_last_event"]] = np.log1p(since)
    out[:, IDX["log1p_item_age_h"]] = np.log1p(age_h)

    valid = recent_labels >= 0  # (B, R)
    pos = recent_labels == 1
    j_last = IDX["last1_rate_logit"]
    for w, k in enumerate(RECENT_WINDOWS):  # right-aligned: the last k columns are the last k events
        out[:, j_last + w] = _logit_rate(pos[:, -k:].sum(1), valid[:, -k:].sum(1))
    out[:, IDX["log1p_recent_n"]] = np.log1p(valid.sum(1))

    # affinity to the candidate's prefixes s_1 and s_1 s_2 (unknown items: no match)
    match1 = (gen[:, None, 0] == recent_gen[:, :, 0]) & valid & known[:, None]  # (B, R)
    match2 = match1 & (gen[:, None, 1] == recent_gen[:, :, 1]) if gen.shape[1] > 1 else match1
    j_p1 = IDX["prefix1_rate_logit"]
    for j, m in enumerate((match1, match2)):
        out[:, j_p1 + 2 * j] = _logit_rate((m & pos).sum(1), m.sum(1))
        out[:, j_p1 + 2 * j + 1] = np.log1p(m.sum(1))
    real = hist_gen[:, :, 0] >= 0  # (B, H)
    h1 = (gen[:, None, 0] == hist_gen[:, :, 0]) & real & known[:, None]
    h2 = h1 & (gen[:, None, 1] == hist_gen[:, :, 1]) if gen.shape[1] > 1 else h1
    n_hist = real.sum(1)
    j_h1 = IDX["hist_prefix1_share"]
    out[:, j_h1] = np.where(n_hist > 0, h1.sum(1) / np.maximum(n_hist, 1), 0.0)
    out[:, j_h1 + 1] = np.where(n_hist > 0, h2.sum(1) / np.maximum(n_hist, 1), 0.0)
    return out.astype(np.float32)
