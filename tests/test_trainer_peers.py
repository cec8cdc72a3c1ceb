"""trainer/peers.py: the Vowpal Wabbit peer, with real VW (no mocks)."""
from __future__ import annotations

import collections
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from trainer.peers import DEFAULT_ARGS, PeerError, VWPeer, feature_name, item_meta_of, title_words

GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Horror", "Film-Noir"]
SMALL = DEFAULT_ARGS.replace("-b 24", "-b 18")  # the same learner with a smaller table: fast to build


def synthetic(n_users=40, n_items=80, n_events=6000, seed=0, sd=4.0):
    """Users who like some genres, items with genres; PIT counters and recent labels from
    strictly earlier events, as the trainer's join gives them (NaN: no feature row yet)."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(0, sd, (n_users, len(GENRES)))
    item_genres = [tuple(sorted(set(rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False).tolist())))
                   for _ in range(n_items)]
    meta = {i: (tuple(GENRES[g] for g in gs), f"Movie {i}: part {i % 7} ({1990 + i % 20})")
            for i, gs in enumerate(item_genres)}
    un, up, inn, ip = (collections.Counter() for _ in range(4))
    recent, last = collections.defaultdict(list), {}
    rows = []
    for k in range(n_events):
        u, i = int(rng.integers(n_users)), int(rng.integers(n_items))
        y = int(rng.random() < 1 / (1 + math.exp(-np.mean(taste[u, list(item_genres[i])]))))
        t = 1_000_000 + k
        rows.append((u, i, y, t, un[u] if u in un else np.nan, up[u] if u in un else np.nan,
                     inn[i] if i in inn else None, ip[i] if i in inn else None, 900_000 + i,
                     list(recent[u][-20:]) if u in recent else None, last.get(u, np.nan)))
        un[u] += 1; up[u] += y; inn[i] += 1; ip[i] += y
        recent[u].append(y); last[u] = t
    cols = ["user_id", "item_id", "label", "event_time", "user_n_events", "user_n_positives",
            "item_n_interactions", "item_n_positives", "created_at", "recent_labels", "last_event_time"]
    return pd.DataFrame(rows, columns=cols), meta


def run(peer, df, frame=512):
    return np.concatenate([peer.score_then_learn(df.iloc[s:s + frame]) for s in range(0, len(df), frame)])


@pytest.fixture(scope="module")
def stream():
    return synthetic()


def test_learns_a_learnable_stream(stream):
    df, meta = stream
    p = run(VWPeer(meta), df)  # the default arguments, -b 24 included
    assert p.shape == (len(df),) and np.all((p > 0) & (p < 1))
    half = len(df) // 2
    assert roc_auc_score(df.label[half:], p[half:]) > 0.75  # 0.83 with these seeds


def test_each_row_is_predicted_before_it_is_learned(stream):
    df, meta = stream
    rows = df.iloc[[10, 20, 30]]
    assert np.all(VWPeer(meta, args=SMALL).score(rows) == 0.5)  # fresh weights: 0.5 for any row
    first = VWPeer(meta, args=SMALL).score_then_learn(rows)
    assert first[0] == 0.5
    # the same positive row twice in one frame: the second score has seen the first's update
    twice = pd.concat([df.iloc[[5]].assign(label=1)] * 2, ignore_index=True)
    p = VWPeer(meta, args=SMALL).score_then_learn(twice)
    assert p[0] == 0.5 and p[1] > p[0]
    # and the frame size does not matter: per event means per event
    a = VWPeer(meta, args=SMALL).score_then_learn(df.iloc[:1500])
    b = run(VWPeer(meta, args=SMALL), df.iloc[:1500], frame=97)
    assert np.array_equal(a, b)


def test_score_does_not_learn(stream):
    df, meta = stream
    peer = VWPeer(meta, args=SMALL)
    peer.score_then_learn(df.iloc[:800])
    rows = df.iloc[800:900]
    s1, s2 = peer.score(rows), peer.score(rows)
    assert np.array_equal(s1, s2)
    assert peer.score_then_learn(rows.iloc[:1])[0] == s1[0]


def test_save_load_round_trip(stream, tmp_path):
    df, meta = stream
    peer = VWPeer(meta, args=SMALL, seed=3)
    run(peer, df.iloc[:3000])
    path = peer.save(tmp_path / "peer" / "vw.model")
    loaded = VWPeer.load(path, meta)  # args and seed from the file saved beside the model
    assert (loaded.args, loaded.seed, loaded.n_learned) == (SMALL, 3, 3000)
    rest = df.iloc[3000:]
    assert np.array_equal(peer.score(rest), loaded.score(rest))
    assert np.array_equal(run(peer, rest), run(loaded, rest))  # learning continues exactly
    with pytest.raises(PeerError):
        VWPeer.load(tmp_path / "missing.model", meta)


def test_missing_features_and_metadata_do_not_crash():
    df = pd.DataFrame({
        "user_id": [1, 2, 3, 4], "item_id": [7, 8, 9, 7], "label": [1, 0, 1, 0],
        "event_time": [10, 11, 12, 13],
        "user_n_events": [np.nan, None, 3, -1], "user_n_positives": [np.nan, None, 5, 0],
        "item_n_interactions": [None, 2.0, np.nan, 1], "item_n_positives": [None, 1.0, np.nan, 1],
        "created_at": [np.nan, 5, None, 20], "last_event_time": [None, np.nan, 9, 12],
        "recent_labels": [None, np.nan, [1, 0, 1], np.array([0, -1, 1])],
    }, dtype=object)
    peer = VWPeer({7: (("Sci Fi:x|y",), "Foo: Bar|Baz (1999)")}, args=SMALL)  # 8 and 9: not in the catalogue
    for ex in peer.examples(df):
        assert "nan" not in ex and "None" not in ex
    p = peer.score_then_learn(df)
    assert np.all(np.isfinite(p)) and p[0] == 0.5
    # only ids and the label are required; a row without a label is only predicted
    bare = VWPeer(args=SMALL).score_then_learn(pd.DataFrame({"user_id": [1, 1], "item_id": [2, 2], "label": [np.nan, 1]}))
    assert bare[0] == 0.5 and bare[1] == 0.5
    with pytest.raises(PeerError):
        peer.score_then_learn(df.drop(columns=["label"]))
    with pytest.raises(PeerError):
        peer.score(df.drop(columns=["item_id"]))


def test_feature_strings_are_escaped():
    assert feature_name(" Sci Fi:x|y ") == "Sci_Fi_x_y"
    assert title_words("Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)") == [
        "amélie", "fabuleux", "destin", "d", "amélie", "poulain", "le", "2001"]
    peer = VWPeer({7: (("Sci Fi:x|y", "Drama"), "Foo: Bar|Baz (1999)")}, args=SMALL)
    ex = peer.examples(pd.DataFrame({"user_id": [1], "item_id": [7]}))[0]
    namespaces = dict(part.strip().split(" ", 1) for part in ex.split("|")[1:])
    assert namespaces["g"] == "Sci_Fi_x_y Drama"
    assert namespaces["t"] == "foo bar baz 1999"
    assert set(namespaces) == {"u", "i", "g", "t", "c", "r"}
    for name in ("u", "i", "g", "t"):
        assert ":" not in namespaces[name]


def test_same_seed_same_scores(stream):
    df, meta = stream
    a, b = run(VWPeer(meta, args=SMALL, seed=1), df.iloc[:2000]), run(VWPeer(meta, args=SMALL, seed=1), df.iloc[:2000])
    assert np.array_equal(a, b)


def test_item_meta_from_a_catalogue():
    class Item:
        genres, title = ("Comedy",), "Toy Story (1995)"

    assert item_meta_of({1: Item()}) == {1: (("Comedy",), "Toy Story (1995)")}


def test_the_era_namespace_is_off_by_default_and_reads_the_titles_year(tmp_path):
    """`era=True` adds TRM's era keys as namespace e (decade, release-age bucket at the event); the
    reported peer stays as the issue fixes it; a saved peer keeps the option."""
    year_s = 365.2425 * 86400
    meta = {1: (("Drama",), "Heat (1995)"), 2: (("Drama",), "Babylon 5")}
    df = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 1], "label": [1, 0, 1],
                       "event_time": [int((1995.5 - 1970) * year_s), 0, int((2000 - 1970) * year_s)]})
    assert not any("|e" in ex for ex in VWPeer(meta, args=SMALL).examples(df))
    peer = VWPeer(meta, args=SMALL + " -q ue", era=True)
    ex = peer.examples(df)
    assert ex[0].endswith(" |e d199 a0") and "|e" not in ex[1] and ex[2].endswith(" |e d199 a3")
    peer.score_then_learn(df)
    again = VWPeer.load(peer.save(tmp_path / "vw.model"), meta)
    assert again.era and again.examples(df) == ex
