"""Request-time features (trainer/features.py): values, and that they never read the event's label."""
import math

import numpy as np
import pandas as pd

from trainer.features import DENSE_FEATURES, IDX, N_DENSE
from trainer.featurizer import Featurizer

L, K = 3, 4


def _row(**kw) -> dict:
    base = {"user_id": 1, "item_id": 9, "label": 1, "event_time": 10_000, "gen_tokens": [1, K + 2, 2 * K + 3],
            "mem_tokens": [5], "tokenizer_version": "v", "created_at": 10_000 - 7200, "retired": False,
            "user_n_events": 4, "user_n_positives": 3, "item_n_interactions": 10, "item_n_positives": 2,
            "hist_gen_tokens": [1, K + 2, 2 * K, 0, K, 2 * K], "hist_item_ids": [3, 4],
            "recent_item_ids": [3, 5, 4, 6], "recent_gen_tokens": [1, K + 2, 2 * K, 1, K + 1, 2 * K,
                                                                   0, K, 2 * K, 1, K + 2, 2 * K + 1],
            "recent_labels": [1, 0, 1, 1], "last_event_time": 10_000 - 60}
    return {**base, **kw}


def test_values_of_one_row():
    df = pd.DataFrame([_row()])
    x = Featurizer(L, K, ngrams=False)(df)[0].stats.numpy()[0]
    assert x.shape == (N_DENSE,) == (len(DENSE_FEATURES),)
    lg = lambda p, n: math.log((p + 1) / (n - p + 1))  # noqa: E731
    assert math.isclose(x[IDX["user_rate_logit"]], lg(3, 4), rel_tol=1e-6)
    assert math.isclose(x[IDX["item_rate_logit"]], lg(2, 10), rel_tol=1e-6)
    assert math.isclose(x[IDX["last1_rate_logit"]], lg(1, 1), rel_tol=1e-6)
    assert math.isclose(x[IDX["last3_rate_logit"]], lg(2, 3), rel_tol=1e-6)
    assert math.isclose(x[IDX["log1p_since_last_event"]], math.log1p(60), rel_tol=1e-6)
    assert math.isclose(x[IDX["log1p_item_age_h"]], math.log1p(2.0), rel_tol=1e-6)
    # recent events sharing the candidate's first token (1): events 0, 1, 3 -> 2 positives of 3
    assert math.isclose(x[IDX["prefix1_rate_logit"]], lg(2, 3), rel_tol=1e-6)
    # sharing its first two tokens (1, K+2): events 0 and 3, both positive
    assert math.isclose(x[IDX["prefix2_rate_logit"]], lg(2, 2), rel_tol=1e-6)
    assert math.isclose(x[IDX["hist_prefix1_share"]], 0.5, rel_tol=1e-6)


def test_nothing_known_is_zero_counts_not_nan():
    df = pd.DataFrame([{"user_id": 1, "item_id": 2, "label": 0, "event_time": 5}])
    x = Featurizer(L, K, ngrams=False)(df)[0].stats.numpy()
    assert np.isfinite(x).all() and x[0, IDX["new_user"]] == 1 and x[0, IDX["new_item"]] == 1


def test_features_never_read_the_events_own_label():
    """Point-in-time: the label of the scored event (and the batch's other labels) change nothing
    of what the models read; only the joined rows (stamped before the event's second) do."""
    rows = [_row(), _row(user_id=2, recent_labels=[0, 0, 1, 0]), _row(item_id=11, gen_tokens=None)]
    fz = Featurizer(L, K, ngrams=False)
    a, _ = fz(pd.DataFrame(rows))
    b, _ = fz(pd.DataFrame([{**r, "label": 1 - r["label"]} for r in rows]))
    for name in ("stats", "gen", "mem", "recent_gen", "recent_labels", "recent_ids", "hist_gen"):
        assert np.array_equal(getattr(a, name).numpy(), getattr(b, name).numpy()), name


def test_recent_events_are_right_aligned_with_unknown_tokens_kept():
    fz = Featurizer(L, K, recent_len=6, ngrams=False)
    bad = _row(recent_gen_tokens=[1, K + 2, 2 * K] * 3 + [99, 99, 99])  # last event: unusable tokens
    batch, _ = fz(pd.DataFrame([bad]))
    assert batch.recent_labels[0].tolist() == [-1, -1, 1, 0, 1, 1]
    assert batch.recent_ids[0].tolist() == [-1, -1, 3, 5, 4, 6]
    assert batch.recent_gen[0, -1].tolist() == [L * K + j for j in range(L)]  # unknown, label kept


def test_a_users_side_is_parsed_once_per_second_and_equals_the_row_by_row_result():
    """Rows of one (user, second) share their history (serving: every candidate of a request); the
    featurizer parses it once per group, and the batch equals featurizing every row alone."""
    from trainer.featurizer import user_groups

    other = {"recent_labels": [0, 0], "recent_item_ids": [7, 8], "recent_gen_tokens": [0, K, 2 * K] * 2,
             "hist_gen_tokens": [0, K, 2 * K], "hist_item_ids": [7]}
    rows = [_row(item_id=9), _row(item_id=10, gen_tokens=[0, K, 2 * K]), _row(user_id=2, **other),
            _row(item_id=11, gen_tokens=None), _row(user_id=2, item_id=12, **other), _row(event_time=10_001)]
    df = pd.DataFrame(rows)
    first, inverse = user_groups(df)
    assert first is not None and len(first) == 3 and inverse.tolist() == [0, 0, 2, 0, 2, 1]
    f = Featurizer(L, K, hist_len=4, recent_len=5, tokenizer_version="v", ngrams=False)
    together, _ = f(df)
    for j in range(len(df)):
        alone, _ = f(df.iloc[[j]])
        for name in ("stats", "gen", "hist_gen", "recent_gen", "recent_ids", "recent_labels", "hist_ids"):
            assert np.array_equal(getattr(together, name)[j].numpy(), getattr(alone, name)[0].numpy()), (j, name)
    assert user_groups(df.iloc[[0]]) == (None, None) and user_groups(df.drop(columns="user_id")) == (None, None)


def test_era_keys_are_the_decade_and_the_release_age_bucket():
    """features.era_keys: from the release-year token (tokenizer/lexical.py) and the event's time;
    -1 without a year, and the bucket -1 without an event time."""
    from tokenizer.lexical import lexical_tokens
    from trainer.features import era_keys

    year_s = 365.2425 * 86400
    at = lambda y: int((y - 1970) * year_s)  # noqa: E731  epoch s of a fractional year
    rows = [lexical_tokens(["Drama"], "Heat (1995)"), lexical_tokens([], "Babylon 5"), lexical_tokens([], "Old (1921)"),
            lexical_tokens(["Drama"], "Heat (1995)"), lexical_tokens(["Drama"], "Heat (1995)")]
    lex = np.full((len(rows), 19), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        lex[i, :len(r)] = r
    t = np.array([at(1995.5), at(2000), at(2000), at(1994.9), at(1997.2)])
    assert era_keys(lex, t).tolist() == [[199, 0], [-1, -1], [192, 6], [199, 0], [199, 2]]
    assert era_keys(lex, None).tolist() == [[199, -1], [-1, -1], [192, -1], [199, -1], [199, -1]]
