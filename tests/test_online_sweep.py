"""bench/online_sweep.py's codes ablation: which online keys it removes or replaces, and its unseen bucket."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from online_sweep import run, unseen, with_codes  # noqa: E402
from trainer.models.config import RankerConfig  # noqa: E402
from trainer.models.ranker import Ranker  # noqa: E402
from trainer.models.user_weights import (CATEGORY_NS, DECADE_NS, ID_NS, MEM_NS, PREFIX_NGRAM_NS,  # noqa: E402
                                         TWO_GRAM_NS, key)

ITEMS = np.array([5, 7, 5, 9])


def _recording():
    cfg = RankerConfig()
    K = cfg.codebook_size
    own = {5: [1, 2, 3], 7: [1, 4, 9], 9: [8, 8, 8]}
    gen = np.array([own[i] for i in ITEMS]) + np.arange(3) * K  # level-offset ids
    prefixes = Ranker.gen_prefix_keys(cfg, torch.from_numpy(gen)).numpy()  # (4, 3)
    mem = key(torch.tensor([[11], [12], [11], [-1]]), MEM_NS).numpy()
    coarse = key(torch.tensor([[40], [41], [40], [42]]), 0).numpy()
    lexical = np.array([[3 * 16 + CATEGORY_NS], [4 * 16 + CATEGORY_NS], [3 * 16 + CATEGORY_NS], [-1]])
    era = key(torch.tensor([[199], [200], [199], [201]]), DECADE_NS).numpy()
    keys = np.concatenate([prefixes, mem, coarse, lexical, era], 1)
    return {"gen": gen, "item": ITEMS}, keys


def test_codes_ablations_touch_only_the_semantic_keys():
    d, keys = _recording()
    content = keys[:, -2:]  # lexical and era keys stay in every ablation
    none = with_codes(d, keys, "none")
    assert (none[:, :-2] == -1).all() and (none[:, -2:] == content).all()
    prefixes = with_codes(d, keys, "prefixes")
    assert (prefixes[:, :3] == keys[:, :3]).all() and (prefixes[:, 3:5] == -1).all()
    assert (with_codes(d, keys, None) == keys).all()
    with pytest.raises(SystemExit, match="codes=oops"):
        with_codes(d, keys, "oops")


def test_random_codes_are_other_items_codes():
    d, keys = _recording()
    own = {tuple(k) for k in keys[:, :3].tolist()}
    for seed in range(20):  # some permutation moves an item; every one keeps the set of code tuples
        rnd = with_codes(d, keys, "random", seed=seed)
        assert (rnd[:, 3:5] == -1).all() and (rnd[:, -2:] == keys[:, -2:]).all()
        assert (rnd[0, :3] == rnd[2, :3]).all()  # one item, one code
        assert {tuple(k) for k in rnd[:, :3].tolist()} == own
        if not (rnd[:, :3] == keys[:, :3]).all():
            break
    else:
        raise AssertionError("no seed moved an item's codes")


def test_other_families_keys():
    """The ID baseline's item id is no semantic key; the n-gram baselines' code n-grams are; keys that
    no gen prefixes lead (TRM's linear model: lexical and era) get no prefixes written over them."""
    d, keys = _recording()
    ids = key(torch.from_numpy(ITEMS[:, None]), ID_NS).numpy()
    for how in ("none", "prefixes", "random"):
        assert (with_codes(d, ids, how) == ids).all()
    grams = np.concatenate([keys[:, :3], key(torch.tensor([[70], [71], [70], [72]]), TWO_GRAM_NS).numpy(),
                            key(torch.tensor([[80], [81], [80], [82]]), PREFIX_NGRAM_NS).numpy()], 1)
    assert (with_codes(d, grams, "prefixes")[:, 3:] == -1).all()
    linear = np.concatenate([keys[:, -2:], keys[:, -2:]], 1)  # (4, 4): wider than the 3 levels
    padded = np.concatenate([np.full((4, 3), -1), keys[:, -2:]], 1)  # empty leading columns are no prefixes
    for how in ("none", "prefixes", "random"):
        assert (with_codes(d, linear, how) == linear).all()
        assert (with_codes(d, padded, how) == padded).all()


def test_codes_do_not_combine_with_the_experimental_designs():
    with pytest.raises(SystemExit, match="does not combine"):
        run({"phase": np.array([1]), "label": np.array([1.0]), "user": np.array([1])}, {"codes": "none", "stack": 1})


def test_unseen_rows_come_from_the_recorded_fit_cutoff():
    d = {"phase": np.array([0, 1, 1, 1]), "created": np.array([np.nan, 10.0, 20.0, 30.0]), "fit_cutoff": np.array(20)}
    assert unseen(d).tolist() == [False, True, True]
    assert unseen({"phase": d["phase"]}) is None  # recordings before the cutoff was kept
