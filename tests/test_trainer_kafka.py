"""`trm train --follow` against a real broker: own group, offsets committed after checkpoints,
and a trainer killed mid-stream resumes without skipping (or double-training) events."""
import pytest

from tests.trainer_fixtures import event_stream, featurizer, make_repo, publish, small_config
from trainer.checkpoint import read_pointer, read_state
from trainer.kafka_source import follow_sync
from trainer.learner import Learner, LearnerConfig
from trainer.pit_join import FeastJoiner
from trainer.prequential import ContinuousTrainer, TrainerCrash

pytestmark = pytest.mark.integration
N = 300


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


def test_follow_waits_for_the_feature_workers(kafka_config, tmp_path):  # noqa: F811
    """A batch is trained only once the workers' group has committed past it (features written)."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from trainer.kafka_source import follow

    stream = event_stream(120)
    joiner = FeastJoiner(str(make_repo(tmp_path, stream)))
    publish(kafka_config, stream)
    tr = make(joiner, tmp_path / "ckpt")
    topic = kafka_config.topic("interactions")

    async def scenario():
        task = asyncio.create_task(follow(tr, kafka_config, group_id="trm-trainer-gate", batch_size=500,
                                          idle_timeout_s=3.0, linger_s=0.5, feature_group="workers-gate",
                                          feature_wait_s=60))
        # a "worker" reads everything (as the streams worker would) while the trainer waits
        worker = AIOKafkaConsumer(group_id="workers-gate", enable_auto_commit=False, auto_offset_reset="earliest",
                                  **kafka_config.aiokafka_kwargs())
        await worker.start()
        worker.assign([TopicPartition(topic, p) for p in range(4)])
        ends, n = {}, 0
        while n < len(stream):
            for tp, msgs in (await worker.getmany(timeout_ms=500)).items():
                n += len(msgs)
                ends[tp] = msgs[-1].offset + 1
        await asyncio.sleep(8)  # the trainer joined its group and read the batch; features are "not written"
        assert tr.state.events_seen == 0 and not task.done()
        await worker.commit(ends)  # what a worker commits after writing those events' features
        await worker.stop()
        t = asyncio.get_running_loop().time()
        done = await asyncio.wait_for(task, 60)
        return done, asyncio.get_running_loop().time() - t

    done, after_commit_s = asyncio.run(scenario())
    assert done == len(stream)
    assert after_commit_s < 20  # released by the commit, not by the 60 s give-up
    assert tr.state.events_seen == len(stream)
