"""`trm train --follow` against a real broker: own group, offsets committed after checkpoints,
and a trainer killed mid-stream resumes without skipping (or double-training) events."""
import pytest

from tests.streams_fixtures import broker, kafka_config  # noqa: F401 (fixtures)
from trainer_fixtures import event_stream, featurizer, make_repo, small_config

from trainer.checkpoint import read_pointer, read_state
from trainer.continuous import ContinuousTrainer, TrainerCrash, follow_sync
from trainer.dataset import FeastJoiner
from trainer.learner import Learner, LearnerConfig

pytestmark = pytest.mark.integration
N = 300


def publish(cfg, events):
    from streams.events import InteractionEvent
    from streams.publisher import publish_kind

    evs = [InteractionEvent(f"r{i}", e.user_id, e.item_id, e.label, e.event_time) for i, e in enumerate(events)]
    publish_kind(cfg, "interactions", evs, progress=False)


def make(joiner, ck, fail_at=None):
    cfg = small_config()
    return ContinuousTrainer(Learner(["trm", "id"], cfg, LearnerConfig(minibatch=50)), joiner, featurizer(cfg),
                             ck, fail_at=fail_at, keep_predictions=True)


def test_follow_crash_and_resume_sees_every_event_once(kafka_config, tmp_path):  # noqa: F811
    stream = event_stream(N)
    joiner = FeastJoiner(str(make_repo(tmp_path, stream)))
    publish(kafka_config, stream)
    ck = tmp_path / "ckpt"
    kw = dict(group_id="trm-trainer-test", batch_size=64, idle_timeout_s=3.0, linger_s=0.5)

    def die_before_commit(phase, step):
        if phase == "checkpointed" and step == 2:  # checkpoint durable, Kafka commit never sent
            raise TrainerCrash(phase)

    first = make(joiner, ck, die_before_commit)
    with pytest.raises(TrainerCrash):
        follow_sync(first, kafka_config, **kw)
    after_crash = read_state(read_pointer(ck))
    assert after_crash.step == 2

    def die_after_train(phase, step):
        if phase == "trained" and step == after_crash.step:  # first batch after resume: trained only
            raise TrainerCrash(phase)

    second = make(joiner, ck, die_after_train)
    with pytest.raises(TrainerCrash):
        follow_sync(second, kafka_config, **kw)
    assert read_state(read_pointer(ck)).events_seen == after_crash.events_seen  # step 3 was lost with the crash

    third = make(joiner, ck)
    follow_sync(third, kafka_config, **kw)
    final = read_state(read_pointer(ck))
    assert final.events_seen == N  # every event trained exactly once in the checkpointed lineage
    assert sum(final.offsets.values()) == N and len(final.offsets) == 4  # 4 partitions, all consumed
    # the last trainer scored exactly what the checkpoint had not yet trained: the lost batch is replayed
    assert len(third.prediction_frame()) == N - after_crash.events_seen
    assert second.fstats.rows > 0  # the crashed trainer did join and train a batch
