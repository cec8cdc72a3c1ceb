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


def test_a_stopping_trainer_publishes_what_it_trained(joiner, stream, tmp_path):
    """A run of fewer steps than the publisher's period still leaves a published model, of its last step
    (a demo on a small dataset had none, and `trm serve` never became ready), without writing the
    checkpoint of that step a second time (LATEST names it: a kill while it is rewritten would leave
    no loadable checkpoint)."""
    from trainer.checkpoint import ModelPublisher

    def run(**kw):
        tr = trainer(joiner, tmp_path, publisher=ModelPublisher(tmp_path / "models", every=20),
                     journal_path=tmp_path / "journal.jsonl", **kw)
        return run_events(tr, stream, BATCH)

    def journal(kind):
        lines = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
        return [x["step"] for x in lines if x["kind"] == kind]

    steps = N_EVENTS // BATCH
    assert run() == N_EVENTS
    assert read_pointer(tmp_path / "models").name == f"v{steps}"
    assert journal("checkpoint") == list(range(1, steps + 1)) and journal("published") == [steps]
    assert run() == 0  # nothing new trained: no new checkpoint nor version
    assert journal("checkpoint") == list(range(1, steps + 1)) and journal("published") == [steps]
    assert sorted(p.name for p in (tmp_path / "models").glob("v*")) == [f"v{steps}"]


def test_learns_the_token_signal(joiner, stream, tmp_path):
    """Items are liked by their first gen-token: a token model beats chance prequentially."""
    from trainer.metrics import auc

    cfg = small_config()
    tr = ContinuousTrainer(Learner(["trm"], cfg, LearnerConfig(minibatch=25, epochs_per_batch=3)), joiner,
                           featurizer(cfg), tmp_path / "ckpt", keep_predictions=True)
    run_events(tr, stream, BATCH // 2)
    late = tr.prediction_frame().iloc[N_EVENTS // 2:]
    assert auc(late["label"], late["score_trm"]) > 0.65


def test_batch_cut_never_splits_a_second():
    """A micro-batch is scored, then trained on: a second split between two batches would have its
    later rows scored by weights that learned its earlier rows' labels."""
    from trainer.batch import batch_cut

    t = [1, 1, 2, 2, 2, 3, 4, 4, 4, 4]
    assert batch_cut(t, 4) == 2  # rows 2-4 are second 2: cut back before it
    assert batch_cut(t, 5) == 5  # row 5 starts a new second: the full size
    assert batch_cut(t, 7) == 6  # second 4 may go on past the rows seen ...
    assert batch_cut(t[6:], 2) == 0  # ... one second throughout and no later row: wait
    assert batch_cut(t[6:], 2, final=True) == 4  # the end of the stream ends it
    assert batch_cut([5, 5, 5, 6], 2) == 3  # one second longer than a batch: to its end
    assert batch_cut(t[:3], 4) == 0 and batch_cut(t[:3], 4, final=True) == 3  # short: wait, or all at the end
    for size in (1, 3, 4, 7):
        s, cuts = 0, []
        while s < len(t):
            s += batch_cut(t[s:], size, final=True)
            cuts.append(s)
        assert cuts[-1] == len(t) and all(t[c] != t[c - 1] for c in cuts[:-1])


def test_batch_cut_splits_only_a_second_longer_than_its_bound():
    """Coarse timestamps (one second for a whole backfill) must not hold every record in memory: a
    second longer than `longest` rows (default 8 × size) is split there, and the split is reported."""
    from trainer.batch import batch_cut, splits_second

    assert batch_cut([5] * 20 + [6], 4) == 20  # within 8 × 4 rows: to the second's end, unsplit
    assert not splits_second([5] * 20 + [6], 20)
    long = [5] * 40 + [6]
    assert batch_cut(long, 4) == 32 and splits_second(long, 32)  # past 32: split after 32 ...
    assert batch_cut(long[32:], 4) == 8 and not splits_second(long[32:], 8)  # ... the rest ends at its change
    assert batch_cut([5] * 40, 4) == 32  # no later row seen yet: the bound alone cuts
    assert batch_cut([5] * 32, 4) == 0 and batch_cut([5] * 32, 4, final=True) == 32  # at the bound: wait
    assert batch_cut(long, 4, longest=10) == 10 and batch_cut(long, 4, longest=2) == 4  # never below the size
    assert batch_cut([1, 1, 2] + [3] * 50, 4) == 3  # a change within the size still cuts back there


def test_in_memory_batches_end_where_the_second_changes(joiner, stream, tmp_path):
    """`run_events` hands the trainer whole seconds: every batch but the last ends at a change of second."""
    from tests.trainer_fixtures import Event

    paired = [Event(e.user_id, e.item_id, e.label, stream[i - i % 3].event_time) for i, e in enumerate(stream)]
    tr = trainer(joiner, tmp_path)
    seen, process = [], tr.process
    tr.process = lambda records, joined=None: (seen.append([r.event_time for r in records]), process(records, joined))[1]
    assert run_events(tr, paired, BATCH) == N_EVENTS
    assert sum(map(len, seen)) == N_EVENTS and all(len(b) <= BATCH for b in seen)
    assert [len(b) for b in seen] == [99, 99, 99, 99, 4]  # seconds of 3 rows: each 100 is cut back to 99
    assert all(a[-1] != b[0] for a, b in zip(seen, seen[1:]))


def test_a_second_longer_than_the_bound_is_split_with_a_warning(joiner, stream, tmp_path, caplog):
    """Coarse timestamps: 400 events stamped with one second, batches of 40 (bound 8 × 40 = 320)."""
    import logging

    from tests.trainer_fixtures import Event

    one = [Event(e.user_id, e.item_id, e.label, stream[0].event_time) for e in stream]
    tr = trainer(joiner, tmp_path)
    seen, process = [], tr.process
    tr.process = lambda records, joined=None: (seen.append(len(records)), process(records, joined))[1]
    with caplog.at_level(logging.WARNING, logger="trainer.prequential"):
        assert run_events(tr, one, 40) == N_EVENTS
    assert seen == [320, 80]
    assert any("holds more than 320 events" in r.getMessage() for r in caplog.records)
