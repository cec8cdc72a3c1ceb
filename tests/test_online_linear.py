"""The per-event linear model beside each ranker (trainer/models/online_linear.py): the point-in-time
rule (a second is scored before any of it is learned, an event's scale never reads another event of
its second), learning, which item keys each family gives it, and the average travelling with the
checkpoint into evaluation."""
import torch

from tests.trainer_fixtures import assert_checkpoint_carries, joined_frame, small_config
from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainer.features import IDX, N_DENSE
from trainer.featurizer import Featurizer
from trainer.learner import Learner, LearnerConfig
from trainer.models import RankerConfig, build_model
from trainer.models.online_linear import OnlineLinear
from trainer.models.user_weights import key
from tokenizer.lexical import YEAR_OFFSET


def rows(users, seconds, labels, seed=0):
    n = len(users)
    return (torch.tensor(users), torch.randn(n, N_DENSE, generator=torch.Generator().manual_seed(seed)),
            torch.tensor(labels, dtype=torch.float32), torch.tensor(seconds))


def test_a_second_is_scored_before_any_of_it_is_learned():
    users, stats, labels, secs = rows([1, 1, 1, 2], [10, 10, 11, 11], [1, 1, 1, 0])
    out = OnlineLinear(bits=10).score_then_learn(users, stats, None, labels, secs)
    assert out[0] == 0 and out[1] == 0  # second 10: nothing learned yet, not even its first event
    assert out[2] != 0 and out[3] != 0  # second 11 sees second 10 (user 2 through the global weights)


def test_no_score_depends_on_its_own_label_or_anything_else_of_its_second():
    users, stats, labels, secs = rows([1, 2, 1, 1, 2], [5, 6, 6, 7, 7], [1, 0, 1, 1, 0])
    keys = key(torch.tensor([3, 4, 3, 4, 3]), 12).unsqueeze(1)
    a = OnlineLinear(bits=10).score_then_learn(users, stats, keys, labels, secs)
    flipped = labels.clone()
    flipped[1:3] = 1 - flipped[1:3]  # the labels of second 6
    b = OnlineLinear(bits=10).score_then_learn(users, stats, keys, flipped, secs)
    assert torch.equal(a[:3], b[:3]) and not torch.equal(a[3:], b[3:])
    # the per-slot scales: a huge feature value on one event of second 6 changes neither the other
    # event of that second nor anything before it
    big = stats.clone()
    big[2, IDX["log1p_user_n_events"]] = 1e4
    c = OnlineLinear(bits=10).score_then_learn(users, big, keys, labels, secs)
    assert torch.equal(a[:2], c[:2])


def test_large_user_ids_keep_their_own_weights():
    """User ids are opaque int64 (hashes in production): one past 2**57 overflowed when tagged and was read
    as padding, every such user sharing one slot with input 0; one of 2**58 + 5 aliased user 5."""
    lin = OnlineLinear(bits=16)
    users = torch.tensor([2 ** 57 + 1, 2 ** 58 - 1, 5])  # x 64 wraps to negative for the first two
    slots, x = lin.inputs(users, torch.ones(3, N_DENSE), None)
    assert (x[:, 1] == 1).all()  # the user's bias is read for every user
    assert len(set(slots[:, 1].tolist())) == 3  # and each user has their own slot
    alias = lin.inputs(torch.tensor([2 ** 58 + 5]), torch.ones(1, N_DENSE), None)[0]
    assert alias[0, 1] != slots[2, 1]
    small = lin.inputs(torch.tensor([5]), torch.ones(1, N_DENSE), None)[0]
    assert torch.equal(small[0], slots[2])  # small ids keep the slots they had


def test_it_learns_a_users_taste_per_key_and_the_rates():
    """User 1 likes items with key 5 and dislikes key 6: the user x key cross learns it."""
    n = 60
    cats = torch.tensor([5, 6] * (n // 2))
    keys = key(cats, 11).unsqueeze(1)
    labels = (cats == 5).float()
    users, stats, _, secs = rows([1] * n, list(range(n)), [0] * n)
    ol = OnlineLinear(bits=12)
    out = ol.score_then_learn(users, torch.zeros_like(stats), keys, labels, secs)
    assert out[-2] > 0 > out[-1]
    mine = ol.logits(torch.tensor([1, 1]), torch.zeros(2, N_DENSE), key(torch.tensor([5, 6]), 11).unsqueeze(1))
    other = ol.logits(torch.tensor([2, 2]), torch.zeros(2, N_DENSE), key(torch.tensor([5, 6]), 11).unsqueeze(1))
    assert mine[0] - mine[1] > other[0] - other[1] > 0  # the cross is this user's, the global weight everyone's
    # a rate logit that tells the label: its global weight turns positive
    r = torch.zeros(n, N_DENSE)
    r[:, IDX["item_rate_logit"]] = torch.where(labels > 0, 2.0, -2.0)
    ol = OnlineLinear(bits=12)
    ol.score_then_learn(torch.arange(n), r, None, labels, secs)  # every event another user
    probe = torch.zeros(2, N_DENSE)
    probe[:, IDX["item_rate_logit"]] = torch.tensor([2.0, -2.0])
    z = ol.logits(torch.tensor([999, 999]), probe, None)
    assert z[0] > 0 > z[1]


def test_token_models_give_it_lexical_tokens_and_only_the_id_baseline_the_id():
    cfg = small_config()
    batch, _ = Featurizer.for_config(cfg, None)(joined_frame(32).sort_values("event_time", kind="stable"))
    trm = build_model("trm", cfg)
    k = trm.linear_keys(batch.select(trm.inputs))
    lex, words = batch.lexical, batch.lexical < YEAR_OFFSET
    assert k.shape == (32, 19 + 2) and bool((k[:, :19][~words | (lex < 0)] == -1).all())
    assert bool(((k[:, :19][words & (lex >= 0)] & 15) >= 11).all())  # namespaces 11 / 12: words, never an item id
    assert torch.equal(k[:, 19:], torch.where(batch.era >= 0, batch.era * 16 + torch.tensor([13, 14]), -1))  # era keys
    assert bool((batch.era >= 0).any()) and bool((batch.era < 0).any())
    idm = build_model("id", cfg)
    assert torch.equal(idm.linear_keys(batch.select(idm.inputs))[:, 0] // 16, batch.item_id)
    for name in ("gen_only", "two_gram", "prefix_ngram"):
        m = build_model(name, cfg)
        assert "item_id" not in m.inputs and m.linear_keys(batch.select(m.inputs)) is not None


def test_old_configs_build_models_without_it():
    old = {k: v for k, v in small_config().to_dict().items() if not k.startswith("linear_")}
    m = build_model("trm", RankerConfig.from_dict(old))
    assert m.online_linear is None and "online_linear.w" not in m.state_dict()


def test_the_learner_averages_it_in_and_the_checkpoint_carries_it_into_evaluation(tmp_path):
    cfg = small_config()
    batch, _ = Featurizer.for_config(cfg, None)(joined_frame(64).sort_values("event_time", kind="stable"))
    lr = Learner(["trm", "id"], cfg, LearnerConfig(seed=0, device="cpu"))
    with_it = lr.predict_then_learn_users(batch)
    off = Learner(["trm", "id"], small_config(linear_mix=0.0), LearnerConfig(seed=0, device="cpu"))
    without = off.predict_then_learn_users(batch)
    for n in lr.names:
        assert lr.models[n].online_linear.w.abs().sum() > 0  # it learned
        assert not (with_it[n] == without[n]).all()
    assert_checkpoint_carries(lr, cfg, batch, tmp_path, "online_linear.n")


def test_a_checkpoint_written_before_the_linear_model_resumes_with_it_empty(tmp_path):
    """An upgraded trainer resumes an older checkpoint: the linear model starts empty, nothing else may be missing."""
    import pytest

    from trainer.checkpoint import CheckpointError

    old = Learner(["trm"], small_config(linear_mix=0.0), LearnerConfig(seed=0, device="cpu"))
    path = save_checkpoint(tmp_path, old.models, old.optimizers, TrainState(step=1))
    new = Learner(["trm"], small_config(), LearnerConfig(seed=0, device="cpu"))
    load_checkpoint(path, new.models, new.optimizers)
    assert float(new.models["trm"].online_linear.w.abs().sum()) == 0
    assert torch.equal(new.models["trm"].wide_dense.weight, old.models["trm"].wide_dense.weight)
    narrow = Learner(["trm"], small_config(linear_mix=0.0, wide_dense=False), LearnerConfig(seed=0, device="cpu"))
    other = save_checkpoint(tmp_path / "other", narrow.models, narrow.optimizers, TrainState(step=1))
    with pytest.raises(CheckpointError, match="wide_dense"):  # a missing parameter still refuses
        load_checkpoint(other, new.models, new.optimizers)


def test_chunks_never_split_a_second():
    """The trainer scores a chunk, then trains on it: a second cut in two would let its later rows be
    scored by weights that learned its earlier rows' labels."""
    from trainer.batch import chunk_bounds

    t = torch.tensor([1, 1, 2, 2, 2, 3, 4, 4, 4, 4])
    assert chunk_bounds(t, 2, 10) == [0, 2, 5, 10]
    assert chunk_bounds(torch.tensor([5] * 6), 2, 6) == [0, 6]
    assert chunk_bounds(None, 4, 10) == [0, 4, 8, 10]
    for step in (1, 3, 7):
        cuts = chunk_bounds(t, step, len(t))
        assert cuts[0] == 0 and cuts[-1] == len(t)
        assert all(t[c] != t[c - 1] for c in cuts[1:-1])
