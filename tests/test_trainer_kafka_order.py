"""`follow` forms its micro-batches from the topic's contents, not from fetch timing: the records of
the interactions partitions are merged in (event_time, partition, offset) order, a batch is the
next `batch_size` of them cut back to a change of second, and a partial batch waits for real idleness (`partial_after_s`) or
`max_events`. Real embedded broker (Tansu), real trainer; `trainer.process` is wrapped only to
record what it is given. The last test checks the merge's release rule alone, against a fake consumer."""
import asyncio
import logging
import time

import pytest

from tests.trainer_fixtures import event_stream, featurizer, make_repo, small_config
from trainer.checkpoint import read_pointer, read_state
from trainer.kafka_source import follow, follow_sync
from trainer.learner import Learner, LearnerConfig
from trainer.metrics import auc
from trainer.pit_join import FeastJoiner
from trainer.prequential import ContinuousTrainer

BATCH = 64


def make(joiner, ck):
    cfg = small_config()
    return ContinuousTrainer(Learner(["trm", "id"], cfg, LearnerConfig(minibatch=50)), joiner, featurizer(cfg),
                             ck, keep_predictions=True)


def record_batches(tr) -> list[list[tuple[str, int]]]:
    """What the real follow hands to `trainer.process`: per batch, its (partition, offset) list."""
    batches, times, process = [], [], tr.process

    def spy(records, joined=None):
        batches.append([(r.partition, r.offset) for r in records])
        times.append(time.monotonic())
        return process(records, joined)

    tr.process = spy
    tr.batch_times = times
    return batches


def publish_chunked(cfg, events, chunk: int = 25, start: int = 0, producer=None) -> None:
    """Interactions in many small produce requests (many record batches per partition), so a small
    fetch size really returns a few records at a time."""
    from streams.contract.events import InteractionEvent
    from streams.publisher import make_producer, publish_kind

    prod = producer or make_producer(cfg, linger_ms=0, batch_size=1024)
    try:
        evs = [InteractionEvent(f"r{start + i}", e.user_id, e.item_id, e.label, e.event_time)
               for i, e in enumerate(events)]
        for i in range(0, len(evs), chunk):
            publish_kind(cfg, "interactions", evs[i:i + chunk], progress=False, producer=prod)
    finally:
        if producer is None:
            prod.close(timeout=10)


def merge_order(cfg) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The topic read directly: its decodable records in (event_time, partition, offset) order,
    and each partition's end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.contract.codec import AvroCodec, DecodeError
    from streams.contract.events import InteractionEvent

    topic, codec = cfg.topic("interactions"), AvroCodec()

    async def read():
        c = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **cfg.aiokafka_kwargs())
        await c.start()
        tps = [TopicPartition(topic, p) for p in range(4)]
        c.assign(tps)
        keys, t = [], time.monotonic()
        try:
            while True:
                for tp, msgs in (await c.getmany(timeout_ms=300)).items():
                    for m in msgs:
                        try:
                            ev = InteractionEvent.from_record(codec.decode(m.value, expect="InteractionEvent"))
                        except DecodeError:
                            continue
                        keys.append((ev.event_time, m.partition, m.offset))
                hw = {tp: c.highwater(tp) for tp in tps}
                pos = {tp: await c.position(tp) for tp in tps}
                if all(h is not None and pos[tp] >= h for tp, h in hw.items()):
                    return keys, {f"{topic}:{tp.partition}": h for tp, h in hw.items()}
                assert time.monotonic() - t < 30
        finally:
            await c.stop()

    keys, ends = asyncio.run(read())
    return [(f"{topic}:{p}", o) for _, p, o in sorted(keys)], ends


def chunks(xs, n=BATCH):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


@pytest.mark.integration
def test_two_runs_with_different_fetching_train_the_same_batches(kafka_config, tmp_path, caplog):  # noqa: F811
    from streams.publisher import publish_raw

    n = 300
    stream = event_stream(n)
    joiner = FeastJoiner(str(make_repo(tmp_path, stream)))
    publish_chunked(kafka_config, stream[:150])
    # a record that does not decode: skipped, and its offset is still passed
    publish_raw(kafka_config, "interactions", [(str(stream[0].user_id).encode(), b"not avro")])
    publish_chunked(kafka_config, stream[150:], start=150)
    expected, ends = merge_order(kafka_config)
    assert len(expected) == n and sum(ends.values()) == n + 1
    topic = kafka_config.topic("interactions")
    assert [p for p, _ in expected] != sorted(p for p, _ in expected)  # the partitions really interleave

    runs = []
    fetching = [dict(linger_s=0.05, consumer_options=dict(max_partition_fetch_bytes=1, fetch_max_wait_ms=50)),
                dict(linger_s=0.5, consumer_options=dict(fetch_max_wait_ms=400))]
    for k, opts in enumerate(fetching):
        tr = make(joiner, tmp_path / f"ckpt{k}")
        batches = record_batches(tr)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="trainer.kafka_source"):
            done = follow_sync(tr, kafka_config, group_id=f"trm-trainer-order{k}", batch_size=BATCH,
                               idle_timeout_s=3.0, partial_after_s=1.0, **opts)
        fetches = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetched")]
        assert done == n
        st = read_state(read_pointer(tmp_path / f"ckpt{k}"))
        assert st.offsets == ends and st.events_seen == n  # the bad record's offset is passed too
        runs.append((batches, fetches, tr))

    (b0, f0, t0), (b1, f1, t1) = runs
    assert f0 != f1 and len(f0) > len(f1)  # the fetches interleaved the partitions differently ...
    assert b0 == b1 == chunks(expected)  # ... the batches did not: the event-time merge of the topic
    assert [len(b) for b in b0] == [64, 64, 64, 64, 44]
    assert all(p.startswith(f"{topic}:") for b in b0 for p, _ in b)
    p0, p1 = t0.prediction_frame(), t1.prediction_frame()
    assert list(p0.event_time) == list(p1.event_time) == sorted(e.event_time for e in stream)  # publish order
    for m in ("trm", "id"):
        a0, a1 = auc(p0.label, p0[f"score_{m}"]), auc(p1.label, p1[f"score_{m}"])
        assert abs(a0 - a1) <= 0.005, (m, a0, a1)


@pytest.mark.integration
def test_partial_batch_only_after_real_idleness(kafka_config, tmp_path):  # noqa: F811
    """The stream pauses for less than `partial_after_s`: no partial batch; the next records join
    the same batch, which is trained `partial_after_s` after the last of them arrived."""
    from streams.publisher import make_producer

    n, first, wait = 120, 100, 4.0
    stream = event_stream(n)
    joiner = FeastJoiner(str(make_repo(tmp_path, stream)))
    publish_chunked(kafka_config, stream[:first])
    tr = make(joiner, tmp_path / "ckpt")
    batches = record_batches(tr)
    producer = make_producer(kafka_config, linger_ms=0, batch_size=1024)

    async def scenario():
        task = asyncio.create_task(follow(tr, kafka_config, group_id="trm-trainer-idle", batch_size=BATCH,
                                          idle_timeout_s=wait + 2, linger_s=0.1, partial_after_s=wait))
        t = time.monotonic()
        while not batches:  # the first full batch (group join ~3 s)
            assert time.monotonic() - t < 60 and not task.done()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # idle, but for less than partial_after_s
        assert len(batches) == 1, batches
        t_pub = time.monotonic()
        await asyncio.to_thread(publish_chunked, kafka_config, stream[first:], 25, first, producer)
        t_acked = time.monotonic()
        done = await asyncio.wait_for(task, 60)
        return done, t_pub, t_acked

    try:
        done, t_pub, t_acked = asyncio.run(scenario())
    finally:
        producer.close(timeout=10)
    expected, _ = merge_order(kafka_config)
    assert done == n
    assert batches == [expected[:BATCH], expected[BATCH:n]]  # one partial batch holding the late records too
    # the last record arrived after t_pub: the partial waited partial_after_s after it, and not much longer
    assert tr.batch_times[1] - t_pub >= wait
    assert tr.batch_times[1] - t_acked < wait + 3


@pytest.mark.integration
def test_max_events_flushes_at_once_and_a_restart_continues_the_merge(kafka_config, tmp_path):  # noqa: F811
    """`max_events` trains the partial batch at once (no idleness wait); the next run re-reads what
    the first had buffered but not trained, and its batches continue the same merge order."""
    n, cut = 150, 100
    stream = event_stream(n)
    joiner = FeastJoiner(str(make_repo(tmp_path, stream)))
    publish_chunked(kafka_config, stream)
    expected, ends = merge_order(kafka_config)
    ck = tmp_path / "ckpt"
    kw = dict(group_id="trm-trainer-max", batch_size=BATCH, linger_s=0.1)

    first = make(joiner, ck)
    batches = record_batches(first)
    t = time.monotonic()
    assert follow_sync(first, kafka_config, max_events=cut, idle_timeout_s=None, partial_after_s=600, **kw) == cut
    assert time.monotonic() - t < 40  # not the 600 s idleness
    assert batches == [expected[:BATCH], expected[BATCH:cut]]
    st = read_state(read_pointer(ck))
    assert st.events_seen == cut and sum(st.offsets.values()) == cut

    second = make(joiner, ck)
    rest = record_batches(second)
    assert follow_sync(second, kafka_config, idle_timeout_s=3.0, partial_after_s=1.0, **kw) == n - cut
    assert rest == [expected[cut:n]]
    assert read_state(read_pointer(ck)).offsets == ends


@pytest.mark.integration
def test_batches_never_split_a_second(kafka_config, tmp_path):  # noqa: F811
    """Rule 3: a batch is cut back to the last change of second among its `batch_size` records, and
    the rest of that second waits for the next batch (seconds of 3 events: 64 -> 63)."""
    from tests.trainer_fixtures import Event
    from trainer.batch import batch_cut

    n = 200
    stream = [Event(e.user_id, e.item_id, e.label, e.event_time - 10 * (i % 3))
              for i, e in enumerate(event_stream(n))]
    joiner = FeastJoiner(str(make_repo(tmp_path, stream)))
    publish_chunked(kafka_config, stream)
    expected, ends = merge_order(kafka_config)
    tr = make(joiner, tmp_path / "ckpt")
    batches = record_batches(tr)
    assert follow_sync(tr, kafka_config, group_id="trm-trainer-seconds", batch_size=BATCH, max_events=n,
                       idle_timeout_s=3.0, partial_after_s=600) == n
    assert [len(b) for b in batches] == [63, 63, 63, 11]
    assert sum(batches, []) == expected
    second = dict(zip(expected, sorted(e.event_time for e in stream)))  # merge order is event-time order
    assert all(second[a[-1]] != second[b[0]] for a, b in zip(batches, batches[1:]))
    assert read_state(read_pointer(tmp_path / "ckpt")).offsets == ends
    assert batch_cut([second[k] for k in expected], BATCH) == 63  # the same rule as the in-memory source


class FakeConsumer:
    """Just what EventTimeMerge reads: assignment, position, high watermark and its fetch's timestamp."""

    def __init__(self, tps):
        self.tps, self.pos, self.hw, self.ts, self.paused = set(tps), dict.fromkeys(tps, 0), {}, {}, set()

    def assignment(self):
        return set(self.tps)

    def highwater(self, tp):
        return self.hw.get(tp)

    def last_poll_timestamp(self, tp):
        return self.ts.get(tp)

    async def position(self, tp):
        return self.pos[tp]

    def pause(self, tp):
        self.paused.add(tp)

    def resume(self, tp):
        self.paused.discard(tp)


def test_merge_waits_for_a_fresh_high_watermark_of_every_empty_partition():
    """Rule 2 without a broker: a partition with nothing buffered blocks the merge until a fetch
    answered after the candidate arrived says it is at its high watermark."""
    from aiokafka import TopicPartition

    from trainer.kafka_source import EventTimeMerge
    from trainer.prequential import Record

    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    c = FakeConsumer([p0, p1])
    m = EventTimeMerge(c, cap=3)

    def rec(p, off, t):
        return Record(1, 1, 1, t, f"t:{p}", off)

    async def scenario():
        for off, t in enumerate([10, 30, 50]):
            m.add(p0, rec(0, off, t), arrival_ms=1000)
        c.pos[p0] = 3
        assert c.paused == {p0}  # cap reached: fetching p0 pauses
        assert await m.release() == 0  # p1: no fetch answered yet
        c.hw[p1], c.ts[p1] = 0, 1000
        assert await m.release() == 0  # answered, but not after the candidate arrived
        c.ts[p1] = 1001
        assert await m.release() == 3 and [r.event_time for r in m.ready] == [10, 30, 50]
        assert c.paused == set()  # drained below the cap: fetching resumes
        m.add(p1, rec(1, 0, 20), arrival_ms=2000)  # p1 now has records, p0 is empty
        m.add(p1, rec(1, 1, 60), arrival_ms=2000)
        c.pos[p1], c.hw[p1], c.ts[p1] = 2, 2, 2001
        c.hw[p0], c.ts[p0] = 3, 1500
        assert await m.release() == 0  # p0's last answer predates p1's records
        m.add(p0, rec(0, 3, 40), arrival_ms=2100)  # a late p0 record: merged in event-time order
        c.pos[p0] = 4
        assert await m.release() == 2  # 20 and 40; then p0 is empty again, with an old answer
        c.hw[p0], c.ts[p0] = 4, 2500
        assert await m.release() == 1
        assert [r.event_time for r in m.ready] == [10, 30, 50, 20, 40, 60]
        assert not await m.idle_since(2500) and await m.idle_since(2000)
        assert [r.event_time for r in m.take(4)] == [10, 30, 50, 20] and len(m.ready) == 2

    asyncio.run(scenario())
