"""bench/online_sweep.py's codes ablation: which online keys it removes or replaces, and its unseen bucket."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from online_sweep import unseen, with_codes  # noqa: E402
from trainer.models.config import RankerConfig  # noqa: E402
from trainer.models.ranker import Ranker  # noqa: E402
from trainer.models.user_weights import CATEGORY_NS, DECADE_NS, MEM_NS, key  # noqa: E402


def _recording():
    cfg = RankerConfig()
    K = cfg.codebook_size
    item = np.array([5, 7, 5, 9])
    own = {5: [1, 2, 3], 7: [1, 4, 9], 9: [8, 8, 8]}
    gen = np.array([own[i] for i in item]) + np.arange(3) * K  # level-offset ids
    prefixes = Ranker.gen_prefix_keys(cfg, torch.from_numpy(gen)).numpy()  # (4, 3)
    mem = key(torch.tensor([[11], [12], [11], [-1]]), MEM_NS).numpy()
    coarse = key(torch.tensor([[40], [41], [40], [42]]), 0).numpy()
    lexical = np.array([[3 * 16 + CATEGORY_NS], [4 * 16 + CATEGORY_NS], [3 * 16 + CATEGORY_NS], [-1]])
    era = key(torch.tensor([[199], [200], [199], [201]]), DECADE_NS).numpy()
    keys = np.concatenate([prefixes, mem, coarse, lexical, era], 1)
    return {"gen": gen, "item": item}, keys


def test_codes_ablations_touch_only_the_semantic_keys():
    d, keys = _recording()
    content = keys[:, -2:]  # lexical and era keys stay in every ablation
    none = with_codes(d, keys, "none")
    assert (none[:, :-2] == -1).all() and (none[:, -2:] == content).all()
    prefixes = with_codes(d, keys, "prefixes")
    assert (prefixes[:, :3] == keys[:, :3]).all() and (prefixes[:, 3:5] == -1).all()
    rnd = with_codes(d, keys, "random")
    assert (rnd[:, 3:5] == -1).all() and (rnd[:, -2:] == content).all()
    assert (rnd[0, :3] == rnd[2, :3]).all()  # one item, one random code
    assert not (rnd[:, :3] == keys[:, :3]).all()
    assert ((rnd[:, :3] & 15) == np.arange(3)).all()  # prefixes stay in their levels' namespaces
    assert (with_codes(d, keys, None) == keys).all()
    with pytest.raises(SystemExit, match="codes=oops"):
        with_codes(d, keys, "oops")


def test_unseen_rows_come_from_the_recorded_fit_cutoff():
    d = {"phase": np.array([0, 1, 1, 1]), "created": np.array([np.nan, 10.0, 20.0, 30.0]), "fit_cutoff": np.array(20)}
    assert unseen(d).tolist() == [False, True, True]
    assert unseen({"phase": d["phase"]}) is None  # recordings before the cutoff was kept


def test_keys_without_leading_prefixes_lose_only_their_semantic_keys():
    """TRM's linear model reads lexical and era keys only: no ablation may write prefixes over them."""
    d, keys = _recording()
    linear = np.concatenate([keys[:, -2:], keys[:, -2:]], 1)  # (4, 4): wider than the 3 levels
    for how in ("none", "prefixes", "random"):
        assert (with_codes(d, linear, how) == linear).all()
