"""Warm start (trainer/warm_start.py): epochs on point-in-time history, early stopping on a later
window, a checkpoint that a follower resumes, and a follower that skips what the weights hold."""
import numpy as np
import pandas as pd
import pytest
import torch

from tests.trainer_fixtures import event_stream, featurizer, make_repo, small_config
from trainer.checkpoint import read_pointer, read_state
from trainer.learner import Learner, LearnerConfig
from trainer.pit_join import FeastJoiner, events_frame
from trainer.prequential import ContinuousTrainer, run_events
from trainer.warm_start import TRAINED_UNTIL, WarmStartConfig, WarmStartError, split_by_time, warm_start

pytestmark = pytest.mark.integration
NAMES = ["trm", "id"]
N_EVENTS = 500


@pytest.fixture(scope="module")
def stream():
    return event_stream(N_EVENTS)


@pytest.fixture(scope="module")
def joiner(tmp_path_factory, stream):
    return FeastJoiner(str(make_repo(tmp_path_factory.mktemp("warm"), stream)))


class CountingJoiner:
    """The real Feast joiner, recording every event frame it was asked to join."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, events: pd.DataFrame) -> pd.DataFrame:
        self.calls.append(events.copy())
        return self.inner(events)


def trainer(joiner, tmp, seed=0, **kw):
    cfg = small_config()
    return ContinuousTrainer(Learner(NAMES, cfg, LearnerConfig(minibatch=50, seed=seed)), joiner, featurizer(cfg),
                             tmp / "ckpt", **kw)


def test_split_keeps_whole_seconds_on_one_side():
    ev = pd.DataFrame({"user_id": 1, "item_id": 2, "label": [0, 1] * 5, "event_time": [1, 1, 2, 2, 3, 3, 3, 3, 4, 5]})
    train, valid, cut = split_by_time(ev, 0.5)
    assert cut == 3 and train["event_time"].max() < cut <= valid["event_time"].min()
    assert len(train) + len(valid) == len(ev)
    with pytest.raises(WarmStartError, match="one second"):
        split_by_time(ev.assign(event_time=7), 0.2)


def test_warm_start_early_stops_keeps_best_epoch_and_checkpoints(joiner, stream, tmp_path):
    history = [e for e in stream if e.event_time < stream[400].event_time]
    tr = trainer(joiner, tmp_path)
    res = warm_start(tr, events_frame(history), WarmStartConfig(max_epochs=6, patience=2, valid_share=0.25))
    assert res.n_train + res.n_valid == len(history) and res.n_valid > 0
    assert 1 <= res.epochs <= 6
    for n in NAMES:
        aucs = res.valid_auc[n]
        assert len(aucs) == res.epochs and res.best_epoch[n] == 1 + int(np.argmax(aucs))
        assert max(aucs) > 0.6  # the stream's labels follow the first gen-token: learnable
    # the weights kept are the best epoch's: scoring the validation rows again gives its AUC
    valid = events_frame([e for e in history if e.event_time >= res.trained_until])
    batch, _ = tr.featurizer(joiner(valid))
    from trainer.metrics import auc
    for n, p in tr.learner.predict(batch).items():
        assert auc(batch.label.numpy(), p) == pytest.approx(max(res.valid_auc[n]), abs=1e-6)
    st = read_state(read_pointer(tmp_path / "ckpt"))
    assert st.extra[TRAINED_UNTIL] == res.trained_until and st.extra["warm_start"]["epochs"] == res.epochs


def test_follower_resumes_the_warm_checkpoint_and_skips_what_it_trained(joiner, stream, tmp_path):
    history = [e for e in stream if e.event_time < stream[400].event_time]
    warm = trainer(joiner, tmp_path)
    res = warm_start(warm, events_frame(history), WarmStartConfig(max_epochs=2, valid_share=0.25))
    weights = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in warm.learner.models.items()}

    counting = CountingJoiner(joiner)
    follower = trainer(counting, tmp_path, seed=99, keep_predictions=True)  # a new process
    assert follower.resume()
    for n, m in follower.learner.models.items():  # resumed the warm-started weights exactly
        assert all(torch.equal(v, weights[n][k]) for k, v in m.state_dict().items())
    done = run_events(follower, stream, 100, resume=False)
    assert done == N_EVENTS and follower.state.events_seen == N_EVENTS
    joined = pd.concat(counting.calls)
    # never joined, scored or trained again: the events the warm start trained on
    assert joined["event_time"].min() >= res.trained_until
    n_new = sum(e.event_time >= res.trained_until for e in stream)
    assert len(joined) == n_new and len(follower.prediction_frame()) == n_new
    assert follower.state.extra["skipped_trained"] == N_EVENTS - n_new


def test_warm_start_refuses_a_window_with_one_label(joiner, stream, tmp_path):
    ev = events_frame(stream[:100]).assign(label=1)
    with pytest.raises(WarmStartError, match="one label"):
        warm_start(trainer(joiner, tmp_path), ev)


def test_block_order_is_a_permutation_of_whole_blocks():
    from trainer.warm_start import block_order
    perm = block_order(10, 4, torch.Generator().manual_seed(0)).tolist()
    assert sorted(perm) == list(range(10))
    starts = [i for i, x in enumerate(perm) if x % 4 == 0]  # where each block begins in the output
    runs = [perm[a:b] for a, b in zip(starts, starts[1:] + [10])]
    assert sorted(runs) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
