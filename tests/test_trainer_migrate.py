"""A checkpoint crosses a tokenizer refresh: token rows remapped by the lineage, dense weights kept."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.trainer_fixtures import (
    T0,
    TOKENIZER_VERSION,
    K,
    L,
    item_tokens,
    joined_frame,
    small_config,
)
from trainer.checkpoint import CheckpointError, read_pointer, read_state
from trainer.featurizer import Featurizer
from trainer.learner import Learner, LearnerConfig
from trainer.migrate import MigrationError, migrate, token_map
from trainer.prequential import ContinuousTrainer, run_events

NEW_VERSION = "test-tokenizer-v2"
RNG = np.random.default_rng(7)
PERM = np.stack([RNG.permutation(K) for _ in range(L)])  # the refit renamed old code c of level l to PERM[l, c]
MEM = {100: 900, 140: 901}  # and two merged mem pieces got new ids (the old ones started them)


def rename_gen(g: int) -> int:
    lvl = g // K
    return int(PERM[lvl, g % K]) + lvl * K


def rename_mem(m: int) -> int:
    return rename_gen(m) if m < L * K else MEM.get(m, m)  # mem ids below L*K are the gen symbols themselves


def lineage(parent: str = TOKENIZER_VERSION) -> dict:
    nearest = np.zeros((L, K), dtype=np.int64)
    for lvl in range(L):
        nearest[lvl, PERM[lvl]] = np.arange(K)  # new id PERM[c] starts from old c
    mem_init = {str(new): old for old, new in MEM.items()}
    for g in range(L * K):  # base symbols follow their gen code (mem id g = gen id g)
        if rename_gen(g) != g:
            mem_init[str(rename_gen(g))] = g
    return {"format": 1, "parent": parent, "levels": L, "codebook_size": K,
            "gen": {"nearest_old": nearest.tolist()}, "mem_init": mem_init}


def renamed(frame: pd.DataFrame) -> pd.DataFrame:
    """The same rows as a refreshed tokenizer writes them: every token renamed, the new version."""
    out = frame.copy()
    for col in ("gen_tokens", "hist_gen_tokens", "recent_gen_tokens"):
        out[col] = [None if v is None else np.array([rename_gen(int(g)) for g in v]) for v in frame[col]]
    out["mem_tokens"] = [None if v is None else np.array([rename_mem(int(m)) for m in v]) for v in frame["mem_tokens"]]
    out["tokenizer_version"] = [None if v is None else NEW_VERSION for v in frame["tokenizer_version"]]
    return out


def frame_with_mem(n: int, seed: int) -> pd.DataFrame:
    f = joined_frame(n, seed=seed)
    f["mem_tokens"] = [None if v is None else np.array([100, 140, int(v[0]) % (L * K)]) for v in f["mem_tokens"]]
    return f


@pytest.mark.parametrize("name", ["trm", "gen_only", "trm_no_ntp"])
def test_a_pure_renaming_migrates_to_identical_scores(name):
    """If the refit only renamed ids, the migrated model scores the renamed rows exactly as the old
    model scored the old rows: every token row (deep, history, NTP-tied, wide mem) moved with its id."""
    cfg = small_config()
    learner = Learner([name], cfg, LearnerConfig(minibatch=32, seed=0))
    old_feat, new_feat = Featurizer.for_config(cfg, TOKENIZER_VERSION), Featurizer.for_config(cfg, NEW_VERSION)
    train, _ = old_feat(frame_with_mem(128, seed=1))
    learner.train(train)  # Adam moments exist, rows are not at init
    probe = frame_with_mem(64, seed=2)
    before = learner.logits(old_feat(probe)[0])[name]
    tmap = token_map(lineage(), NEW_VERSION, TOKENIZER_VERSION, L, K)
    rows = migrate(learner.models, learner.optimizers, tmap)
    after = learner.logits(new_feat(renamed(probe))[0])[name]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert rows[name]["gen_rows"] == tmap.gen_moved > 0
    assert rows[name]["mem_rows"] == (len(tmap.mem_src) if name.startswith("trm") else 0)
    # without the migration the renamed rows score differently: the test can fail
    fresh = Learner([name], cfg, LearnerConfig(minibatch=32, seed=0))
    fresh.train(train)
    assert not torch.allclose(fresh.logits(new_feat(renamed(probe))[0])[name], before, atol=1e-4)


def test_token_map_refuses_what_no_lineage_connects():
    with pytest.raises(MigrationError, match="fresh fit with no lineage.*trm tokenizer refit --from"):
        token_map(None, NEW_VERSION, TOKENIZER_VERSION, L, K)
    with pytest.raises(MigrationError, match="refitted from other-v0: no mapping connects them"):
        token_map(lineage(parent="other-v0"), NEW_VERSION, TOKENIZER_VERSION, L, K)
    with pytest.raises(MigrationError, match="maps 3x16 codes, the ranker has 3x32"):
        token_map(lineage(), NEW_VERSION, TOKENIZER_VERSION, L, 32)


def _joiner(version_of_item):
    """records -> joined rows; tokens renamed for the items `version_of_item` says are refreshed."""
    cols = list(joined_frame(2).columns)

    def join(df: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for r in df.itertuples(index=False):
            gen, mem = item_tokens(int(r.item_id))
            v = version_of_item(int(r.event_time))
            if v == NEW_VERSION:
                gen, mem = [rename_gen(g) for g in gen], [rename_mem(m) for m in mem]
            row = {c: None for c in cols}
            row.update(user_id=r.user_id, item_id=r.item_id, label=r.label, event_time=r.event_time,
                       gen_tokens=np.array(gen), mem_tokens=np.array(mem), tokenizer_version=v,
                       created_at=T0 - 100, retired=False, user_n_events=np.nan, user_n_positives=np.nan,
                       item_n_interactions=np.nan, item_n_positives=np.nan, last_event_time=np.nan)
            rows.append(row)
        return pd.DataFrame(rows, columns=cols)
    return join


def _events(n=300):
    from tests.trainer_fixtures import event_stream

    return event_stream(n)


def _trainer(tmp, version, lin, switch_at):
    cfg = small_config()
    return ContinuousTrainer(Learner(["trm", "id"], cfg, LearnerConfig(minibatch=50, seed=0)),
                             _joiner(lambda t: NEW_VERSION if t >= switch_at else TOKENIZER_VERSION),
                             Featurizer.for_config(cfg, version), tmp / "ckpt", lineage=lin)


def test_trainer_resumes_across_a_refresh_and_keeps_training(tmp_path):
    events = _events()
    switch = events[200].event_time
    first = _trainer(tmp_path, TOKENIZER_VERSION, None, switch)
    assert run_events(first, events[:200], 100) == 200
    dense = {k: v.clone() for k, v in first.learner.models["trm"].state_dict().items() if "emb" not in k
             and "wide.bag" not in k}
    # the refreshed trainer: features now carry NEW_VERSION; the artifact's lineage names the old one
    second = _trainer(tmp_path, NEW_VERSION, lineage(), switch)
    assert second.resume()
    assert second.state.tokenizer_version == NEW_VERSION and second.state.step == 2
    mig = second.state.extra["migrations"]
    assert mig[-1]["from"] == TOKENIZER_VERSION and mig[-1]["to"] == NEW_VERSION and mig[-1]["step"] == 2
    kept = second.learner.models["trm"].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in dense.items())  # dense weights untouched
    old_gen = first.learner.models["trm"].gen_emb.weight_table.weight
    new_gen = second.learner.models["trm"].gen_emb.weight_table.weight
    g = 3  # old gen id 3 (level 0) now answers to PERM[0, 3]
    assert torch.equal(new_gen[rename_gen(g)], old_gen[g])
    assert run_events(second, events, 50) == 100  # resumes at offset 200, goes on training on the new tokens
    st = read_state(read_pointer(tmp_path / "ckpt"))
    assert st.tokenizer_version == NEW_VERSION and st.events_seen == 300 and st.extra["migrations"]
    third = _trainer(tmp_path, NEW_VERSION, lineage(), switch)  # a restart after the refresh: no second migration
    assert third.resume() and len(third.state.extra["migrations"]) == 1


def test_trainer_refuses_a_checkpoint_no_lineage_connects(tmp_path):
    events = _events(100)
    first = _trainer(tmp_path, TOKENIZER_VERSION, None, events[-1].event_time + 1)
    run_events(first, events, 100)
    for lin, msg in ((None, "fresh fit with no lineage"), (lineage(parent="other-v0"), "no mapping connects")):
        with pytest.raises(CheckpointError, match=msg):
            _trainer(tmp_path, NEW_VERSION, lin, 0).resume()
