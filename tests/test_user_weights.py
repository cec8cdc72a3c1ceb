"""Per-user online weights (trainer/models/user_weights.py): second-by-second ordering, the
point-in-time rule, learning, and the table travelling with the checkpoint."""
import torch

from tests.trainer_fixtures import joined_frame, small_config
from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainer.features import N_DENSE
from trainer.featurizer import Featurizer
from trainer.learner import Learner, LearnerConfig
from trainer.models import build_model
from trainer.models.user_weights import UserWeights


def rows(users, seconds, labels):
    n = len(users)
    return (torch.zeros(n), torch.tensor(users), torch.randn(n, N_DENSE, generator=torch.Generator().manual_seed(0)),
            torch.tensor(labels, dtype=torch.float32), torch.tensor(seconds))


def test_a_second_is_scored_before_any_of_it_is_learned():
    uw = UserWeights(bits=10)
    base, users, stats, labels, secs = rows([1, 1, 1, 2], [10, 10, 11, 11], [1, 1, 1, 0])
    out = uw.score_then_learn(base, users, stats, labels, secs)
    assert out[0] == 0 and out[1] == 0  # second 10: nothing learned yet, not even its first event
    assert out[2] != 0  # second 11 sees what user 1 did in second 10
    assert out[3] == 0  # user 2 has no past


def test_no_score_depends_on_its_own_label_or_its_second():
    base, users, stats, labels, secs = rows([1, 1, 1, 1, 1], [5, 6, 6, 7, 7], [1, 0, 1, 1, 0])
    a = UserWeights(bits=10).score_then_learn(base, users, stats, labels, secs)
    flipped = labels.clone()
    flipped[1:3] = 1 - flipped[1:3]  # the labels of second 6
    b = UserWeights(bits=10).score_then_learn(base, users, stats, flipped, secs)
    assert torch.equal(a[:3], b[:3])  # seconds 5 and 6 unchanged
    assert not torch.equal(a[3:], b[3:])  # second 7 learned from second 6


def test_a_user_who_likes_everything_is_scored_higher_over_time():
    n = 50
    uw = UserWeights(bits=10)
    base, users, stats, labels, secs = rows([3] * n, list(range(n)), [1] * n)
    out = uw.score_then_learn(base, users, torch.zeros_like(stats), labels, secs)
    assert out[0] == 0 and out[-1] > out[n // 2] > 0.5
    assert uw.logits(torch.tensor([3]), torch.zeros(1, N_DENSE)) > 0
    assert uw.logits(torch.tensor([4]), torch.zeros(1, N_DENSE)) == 0  # another user: untouched


def test_learner_scores_with_the_table_and_the_checkpoint_carries_it(tmp_path):
    cfg = small_config()
    df = joined_frame(64)
    batch, _ = Featurizer.for_config(cfg, None)(df.sort_values("event_time", kind="stable"))
    lr = Learner(["trm", "id"], cfg, LearnerConfig(seed=0))
    plain = lr.predict(batch)
    online = lr.predict_then_learn_users(batch)
    for n in lr.names:
        assert lr.models[n].user_weights.w.abs().sum() > 0  # it learned
        assert plain[n].shape == online[n].shape
    path = save_checkpoint(tmp_path, lr.models, lr.optimizers, TrainState(step=1))
    fresh = {n: build_model(n, cfg) for n in lr.names}
    load_checkpoint(path, fresh, restore_rng=False)
    for n in lr.names:
        assert torch.equal(fresh[n].user_weights.w, lr.models[n].user_weights.w)
        m = fresh[n].eval()
        with torch.no_grad():
            want = lr.models[n].eval().personal_logit(batch.select(m.inputs), batch.user_id)
            assert torch.allclose(m.personal_logit(batch.select(m.inputs), batch.user_id), want)


def test_old_configs_build_models_without_the_table():
    from trainer.models import RankerConfig
    old = {k: v for k, v in small_config().to_dict().items() if k != "user_weights"}
    assert build_model("trm", RankerConfig.from_dict(old)).user_weights is None
    assert "user_weights.w" not in build_model("id", RankerConfig.from_dict(old)).state_dict()
