"""The continuous trainer: prequential metrics, and a crash mid-stream that skips nothing."""
import json

import pytest
import torch

from tests.trainer_fixtures import event_stream, featurizer, make_repo, small_config
from trainer.checkpoint import read_pointer, read_state
from trainer.learner import Learner, LearnerConfig
from trainer.pit_join import FeastJoiner
from trainer.prequential import ContinuousTrainer, TrainerCrash, run_events

pytestmark = pytest.mark.integration
NAMES = ["trm", "id", "gen_only", "two_gram", "prefix_ngram"]
N_EVENTS, BATCH = 400, 100


@pytest.fixture(scope="module")
def stream():
    return event_stream(N_EVENTS)


@pytest.fixture(scope="module")
def joiner(tmp_path_factory, stream):
    return FeastJoiner(str(make_repo(tmp_path_factory.mktemp("cont"), stream)))


def trainer(joiner, tmp, seed=0, **kw):
    cfg = small_config()
    return ContinuousTrainer(Learner(NAMES, cfg, LearnerConfig(minibatch=50, seed=seed)), joiner, featurizer(cfg),
                             tmp / "ckpt", log_path=tmp / "metrics.jsonl", **kw)


def state(tr):
    return {f"{n}.{k}": v.clone() for n, m in tr.learner.models.items() for k, v in m.state_dict().items()}


def test_crash_between_train_and_checkpoint_replays_one_batch_and_ends_identical(joiner, stream, tmp_path):
    straight = trainer(joiner, tmp_path / "a", keep_predictions=True)
    assert run_events(straight, stream, BATCH) == N_EVENTS
    preds = straight.prediction_frame()
    assert len(preds) == N_EVENTS and preds["label"].tolist() == [e.label for e in stream]

    def die(phase, step):
        if phase == "trained" and step == 2:  # third batch trained, its checkpoint never written
            raise TrainerCrash(phase)

    crashed = trainer(joiner, tmp_path / "b", fail_at=die)
    with pytest.raises(TrainerCrash):
        run_events(crashed, stream, BATCH)
    ck = read_state(read_pointer(tmp_path / "b" / "ckpt"))
    assert ck.step == 2 and ck.offsets == {"memory:0": 2 * BATCH}

    restarted = trainer(joiner, tmp_path / "b", seed=123)  # a new process: fresh weights, other seed
    done = run_events(restarted, stream, BATCH)
    assert done == N_EVENTS - 2 * BATCH  # resumes at the checkpoint: batch 3 replayed, nothing skipped
    assert restarted.state.offsets == {"memory:0": N_EVENTS} and restarted.state.events_seen == N_EVENTS
    a, b = state(straight), state(restarted)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the run that never crashed

    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(NAMES) * N_EVENTS // BATCH
    assert {x["model"] for x in lines} == set(NAMES)
    assert all(0 <= x["auc"] <= 1 for x in lines if x["auc"] is not None)
    assert straight.timings.join_s > 0 and straight.fstats.rows == N_EVENTS


def test_learns_the_token_signal(joiner, stream, tmp_path):
    """Items are liked by their first gen-token: a token model beats chance prequentially."""
    from trainer.metrics import auc

    cfg = small_config()
    tr = ContinuousTrainer(Learner(["trm"], cfg, LearnerConfig(minibatch=25, epochs_per_batch=3)), joiner,
                           featurizer(cfg), tmp_path / "ckpt", keep_predictions=True)
    run_events(tr, stream, BATCH // 2)
    late = tr.prediction_frame().iloc[N_EVENTS // 2:]
    assert auc(late["label"], late["score_trm"]) > 0.65
