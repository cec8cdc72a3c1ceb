"""Fault injection, broker crash: Tansu is killed with SIGKILL while interactions are being
published and consumed, and restarted on the same port 3 s later — once with memory storage (the
embedded default) and once with durable S3 storage (a moto S3 server stands in for the bucket).

What must hold for both: the publisher rides out the outage (kafka-python reconnects with backoff
and resends within `delivery_timeout_ms`) and never reports success for an unacknowledged record;
the worker keeps running, retries what failed and resumes on its own.
What differs, measured and asserted:
  - durable: nothing acknowledged is lost; the group's offsets survive; the end state equals a
    from-scratch computation over every event.
  - memory: the new broker is empty. The worker sees its partitions' logs end below its saved
    high-water marks, declares a log reset, and reads the new logs from offset 0; events the old
    broker had acknowledged but the worker had not applied yet are lost (counted here).
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.fault_checks import assert_recovered, committed_total
from tests.services import start_s3
from tests.stream_checks import HISTORY_LEN

pytestmark = pytest.mark.integration
CHUNK = 50


@pytest.mark.parametrize("storage", ["memory", "s3"])
def test_broker_kill_9_and_restart(storage, feast_repo, tiny_tokenizer, ml_slice, tmp_path):  # noqa: F811
    from streams.app import StreamWorker, WorkerSettings
    from streams.broker import EmbeddedBroker
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import INTERACTIONS, create_topics, topic_plan
    from streams.feast_sink import FeastSink
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_kind
    from tokenizer.hybrid import HybridTokenizer

    items, its = ml_slice
    n, m = len(items), len(its)
    inter = [InteractionEvent.from_interaction(i) for i in its]
    first, middle = inter[:m // 3], inter[m // 3:]
    s3 = start_s3() if storage == "s3" else None
    broker = EmbeddedBroker(storage=f"s3://{s3.bucket}/" if s3 else "memory://tansu/",
                            env=s3.tansu_env() if s3 else None, log_path=str(tmp_path / "tansu.log"))
    seen: dict = {}
    # memory storage: after the restart the publisher sends its next chunk only once the worker has
    # declared the reset of every interactions partition. A new log that outgrows a running worker's
    # positions before its first fetch from the new broker is read on from there, which no check sees
    # (a running worker checks a log that ends before what it read: the third test; the fingerprint
    # catches a new log that outgrew the positions of a worker that was down: the second test);
    # ungated, a CI run beside another job once saw 70 records of the new log skipped here.
    detected = threading.Event()
    if storage == "s3":
        detected.set()
    try:
        broker.start()
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
        create_topics(cfg)

        def publish_through_the_outage():
            try:  # chunks with small gaps, so the kill lands mid-stream
                for k in range(0, len(middle), CHUNK):
                    publish_kind(cfg, "interactions", middle[k:k + CHUNK], progress=False)
                    seen["published"] = k + CHUNK
                    if "killed_after" in seen:  # the chunk in flight at the kill went through the outage
                        detected.wait(90)
                    time.sleep(0.05)
            except Exception as exc:  # asserted below: must not happen for a 3 s outage
                seen["publish_error"] = exc

        async def scenario():
            settings = WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer, kafka=cfg,
                                      history_len=HISTORY_LEN, retry_initial_s=0.2, retry_max_s=2.0,
                                      retry_budget_s=120)
            async with StreamWorker(settings) as w:
                await w.wait_ready(60)
                await asyncio.to_thread(publish_kind, cfg, "items", [ItemEvent.from_item(i) for i in items.values()],
                                        progress=False)
                await asyncio.to_thread(publish_kind, cfg, "interactions", first, progress=False)
                await w.wait_for(items=n, interactions=len(first), timeout=120)
                pub = threading.Thread(target=publish_through_the_outage)
                pub.start()
                while seen.get("published", 0) < 4 * CHUNK:
                    await asyncio.sleep(0.01)
                broker.kill()  # SIGKILL mid-stream
                seen["killed_after"] = seen["published"]
                seen["applied_at_kill"] = w.status()[INTERACTIONS]["processed"]
                await asyncio.sleep(3)
                await asyncio.to_thread(broker.restart, True, cfg)
                parts = topic_plan()[INTERACTIONS]
                deadline = time.monotonic() + 60
                while not detected.is_set() and time.monotonic() < deadline:
                    if w.status()[INTERACTIONS]["log_resets"] >= parts:
                        detected.set()
                    await asyncio.sleep(0.05)
                seen["resets_before_resume"] = w.status()[INTERACTIONS]["log_resets"]
                detected.set()  # on a timeout the assertions below say what went wrong
                await asyncio.to_thread(pub.join, 120)
                assert not pub.is_alive()
                # caught up: the worker's group committed everything the (possibly new) log holds
                want = await asyncio.to_thread(_log_size, cfg, INTERACTIONS)
                await _committed_up_to(w, cfg, want)
                seen["status"] = w.status()
                seen["log_size"] = want

        asyncio.run(scenario())
        assert "publish_error" not in seen, f"the publisher gave up during a 3 s outage: {seen.get('publish_error')!r}"
        st = seen["status"][INTERACTIONS]
        assert st["dead_lettered"] == 0
        sink = FeastSink(feast_repo)
        users = sorted({i.user_id for i in its})
        applied = sum(r["user_n_events"] or 0 for r in sink.read_online("user_history", users).values())
        lost = m - applied
        if storage == "s3":
            assert seen["log_size"] == m, "the durable log kept every acknowledged record"
            assert st["log_resets"] == 0 and lost == 0
            assert_recovered(cfg, feast_repo, items, its, HybridTokenizer.load(tiny_tokenizer))
        else:
            assert seen["log_size"] < m, "a memory broker restarts empty"
            assert st["log_resets"] >= 1, "the worker must notice its logs were replaced"
            assert seen["resets_before_resume"] >= topic_plan()[INTERACTIONS], "every partition's reset, before more data"
            # every record of the new log was applied, or dropped as a duplicate: a chunk the old broker
            # wrote (and the worker applied) but never acknowledged is resent by the publisher;
            # what is lost is what the old broker held and the worker had not applied yet
            assert applied + st["duplicates"] >= len(first) + seen["log_size"]
            assert 0 <= lost <= m - len(first) - seen["log_size"] + st["duplicates"]
        print(f"\n[{storage}] killed after {seen['killed_after']} of {len(middle)} records of the second stream "
              f"were acknowledged ({seen['applied_at_kill']} of {m} applied by then); after the restart the "
              f"log holds {seen['log_size']}; applied {applied}/{m}, lost {lost}; worker: duplicates {st['duplicates']}, "
              f"retries {st['retries']}, "
              f"log resets {st['log_resets']}")
    finally:
        broker.stop()
        if s3 is not None:
            s3.stop()


@pytest.mark.parametrize("first_look", ["answers", "fails"])
def test_a_new_log_that_outgrew_the_old_positions_is_detected(first_look, feast_repo, tiny_tokenizer, ml_slice,  # noqa: F811
                                                               tmp_path, monkeypatch, caplog):
    """The race the test above gates: a memory broker restarts while the worker is down, and the new
    log grows past the worker's saved high-water marks before the worker looks. The log no longer
    ends below them; the record at each mark is another one (its fingerprint, saved with the mark,
    differs), so the worker still declares the reset and applies the whole new log. Before the
    fingerprint it resumed after the old marks and skipped the new log's first records.

    `fails`: every loop's first look at its logs fails (a refused connection). aiokafka logs a
    failing rebalance callback and fetches from the committed offsets anyway; the code before applied
    the new log from the old positions and never reported ready. Now no record of those partitions
    is applied until the loop's retry of the check has succeeded."""
    import logging

    from streams.batch_loop import BatchLoop
    from streams.broker import EmbeddedBroker
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import INTERACTIONS, topic_plan
    from streams.feast_sink import FeastSink
    from streams.publisher import publish_kind

    caplog.set_level(logging.WARNING, logger="streams.batch_loop")
    items, its = ml_slice
    inter = [InteractionEvent.from_interaction(i) for i in its]
    first, second = inter[:len(inter) // 3], inter[len(inter) // 3:]  # the new log: twice the old one
    item_events = [ItemEvent.from_item(i) for i in items.values()]
    broker = EmbeddedBroker(storage="memory://tansu/", log_path=str(tmp_path / "tansu.log"))
    try:
        cfg, settings = _worker_on(broker, feast_repo, tiny_tokenizer, session_timeout_ms=6000)

        _worker_run(cfg, settings, item_events, first, len(first))
        broker.kill()  # the worker is down: nothing of it runs while the new log grows
        broker.restart(True, cfg)
        publish_kind(cfg, "items", item_events, progress=False)
        publish_kind(cfg, "interactions", second, progress=False)
        if first_look == "fails":
            failed: set = set()
            log_ends = BatchLoop._log_ends

            async def failing_once(self, tps, probe=None):  # each loop's first look at its logs fails
                if id(self) not in failed:
                    failed.add(id(self))
                    raise ConnectionError("injected: the first look at the logs failed")
                return await log_ends(self, tps, probe)

            monkeypatch.setattr(BatchLoop, "_log_ends", failing_once)
            caplog.clear()
        st = _worker_run(cfg, settings, item_events, None, _log_size(cfg, INTERACTIONS))
        if first_look == "fails":
            assert [r for r in caplog.records if r.getMessage().startswith("checking the positions of")
                    and cfg.topic(INTERACTIONS) + "'" in r.getMessage()], \
                "the interactions loop's check on assignment failed (the injected fault)"
        assert st["log_resets"] == topic_plan()[INTERACTIONS], st
        users = sorted({i.user_id for i in its})
        applied = sum(r["user_n_events"] or 0 for r in FeastSink(feast_repo).read_online("user_history", users).values())
        assert applied == len(first) + len(second), "every record of the new log applied, none skipped"
    finally:
        broker.stop()


def test_a_running_worker_checks_a_log_replaced_under_it(feast_repo, tiny_tokenizer, ml_slice, tmp_path,  # noqa: F811
                                                          caplog):
    """A memory broker restarts under a running worker, and a new log twice the old one is published
    once the worker has fetched from the new broker. Its fetch responses say the logs now end before
    what it read; the consumer waits at its old positions until the new log outgrows them, and the
    worker checks those first records before applying them (`BatchLoop._log_moved`): another record
    at the saved high-water mark, so the log is new and is read from its beginning. Before, it
    applied the new log from the old positions as if it continued the old one, and the check when it
    rejoined the group found its high-water marks on the new log and let them pass: the new log's
    first records were lost (the race the first test gates)."""
    import logging

    from streams.app import StreamWorker
    from streams.broker import EmbeddedBroker
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import INTERACTIONS, topic_plan
    from streams.feast_sink import FeastSink
    from streams.publisher import publish_kind

    caplog.set_level(logging.WARNING, logger="streams.batch_loop")
    parts = topic_plan()[INTERACTIONS]
    items, its = ml_slice
    inter = [InteractionEvent.from_interaction(i) for i in its]
    first, second = inter[:len(inter) // 3], inter[len(inter) // 3:]  # the new log: twice the old one
    broker = EmbeddedBroker(storage="memory://tansu/", log_path=str(tmp_path / "tansu.log"))

    def seen(text: str) -> set[int]:  # interactions partitions the running loop logged `text` for
        return _logged(caplog, cfg.topic(INTERACTIONS), text)

    try:
        cfg, settings = _worker_on(broker, feast_repo, tiny_tokenizer, session_timeout_ms=20_000)

        async def scenario():
            async with StreamWorker(settings) as w:
                await w.wait_ready(60)
                await asyncio.to_thread(publish_kind, cfg, "items", [ItemEvent.from_item(i) for i in items.values()],
                                        progress=False)
                await asyncio.to_thread(publish_kind, cfg, "interactions", first, progress=False)
                await _committed_up_to(w, cfg, len(first))
                broker.kill()
                await asyncio.to_thread(broker.restart, True, cfg)  # the worker keeps running
                deadline = time.monotonic() + 30
                while seen("the log now ends at") != set(range(parts)):  # its fetches reached the new broker
                    assert time.monotonic() < deadline, f"shrunk logs seen: {sorted(seen('the log now ends at'))}"
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(publish_kind, cfg, "interactions", second, progress=False)
                await _committed_up_to(w, cfg, len(second))
                return w.status()[INTERACTIONS]

        st = asyncio.run(scenario())
        users = sorted({i.user_id for i in its})
        applied = sum(r["user_n_events"] or 0 for r in FeastSink(feast_repo).read_online("user_history", users).values())
        print(f"\napplied {applied} of {len(first) + len(second)}; log resets {st['log_resets']}; checked by the "
              f"running loop: {sorted(seen('checking whether the log was replaced'))}")
        assert st["log_resets"] == parts, st
        assert applied == len(first) + len(second), "every record of the new log applied, none skipped"
    finally:
        broker.stop()


def test_a_stateless_loop_tells_a_lagging_log_from_a_new_one_by_its_last_record(kafka_config):
    """The check a running loop without saved state (items) makes when its log seemed to end before what
    it read, then holds records there again (`BatchLoop._positions` with `read`, from `_log_moved`): the
    record the log holds at the last offset read decides, as a saved mark would. The same record: the
    log is intact (a real Kafka's lagging leader), nothing is read again. Another: a new log, read from
    its beginning. Without it the loop either read a new log on from the old positions, or (read
    blindly again) re-tokenized a whole retained items log on every lagging leader."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from kafka import KafkaProducer

    from streams.batch_loop import BatchLoop, LoopSettings
    from streams.processor import BaseProcessor, record_mark

    cfg = kafka_config
    topic = cfg.topic("items")
    producer = KafkaProducer(**cfg.kafka_python_kwargs())
    for k in range(10):
        producer.send(topic, key=b"k%d" % k, value=b"v%d" % k, partition=0)
    producer.flush()
    producer.close()

    async def check(mark: int, group: str) -> tuple[int, int]:
        loop = BatchLoop(cfg, LoopSettings("items", group, threaded=False), BaseProcessor)
        loop.processor = BaseProcessor()  # no saved state: hwm -1, no mark
        loop.consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **cfg.aiokafka_kwargs())
        await loop.consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            loop.consumer.assign([tp])
            loop.consumer.seek(tp, 10)
            await loop._positions([tp], floor={tp: 10}, read={tp: (9, mark)})
            return loop.log_resets, await loop.consumer.position(tp)
        finally:
            await loop.consumer.stop()

    assert asyncio.run(check(record_mark(b"k9", b"v9"), "intact")) == (0, 10)
    assert asyncio.run(check(record_mark(b"another", b"record"), "replaced")) == (1, 0)


def test_a_running_items_loop_reads_a_log_replaced_under_it(feast_repo, tiny_tokenizer, ml_slice, tmp_path,  # noqa: F811
                                                            caplog):
    """The items loop keeps no state. A memory broker restarts under the running worker; once its
    fetches have seen the items logs end before what it read, a new log is published whose first
    records are items the old log never held. Every new item gets its tokens: the loop reads the new
    log from its beginning, either when records come at the old positions again (the record there is
    not the one it read last: the test above) or when it rejoins the group and finds no committed
    offset on the new broker, whichever comes first (both seen here)."""
    import logging

    from streams.app import StreamWorker
    from streams.broker import EmbeddedBroker
    from streams.contract.events import ItemEvent
    from streams.contract.topics import ITEMS
    from streams.feast_sink import FeastSink
    from streams.publisher import publish_kind
    from tests.fault_checks import committed_total

    caplog.set_level(logging.WARNING, logger="streams.batch_loop")
    items, _ = ml_slice
    ids = sorted(items)
    old, new = ids[:len(ids) // 2], ids[len(ids) // 2:]  # the new log: the new items first, then the old ones
    events = {i: ItemEvent.from_item(items[i]) for i in ids}
    broker = EmbeddedBroker(storage="memory://tansu/", log_path=str(tmp_path / "tansu.log"))

    def seen(text: str) -> set[int]:  # items partitions the running loop logged `text` for
        return _logged(caplog, cfg.topic(ITEMS), text)

    try:
        cfg, settings = _worker_on(broker, feast_repo, tiny_tokenizer, session_timeout_ms=20_000)

        async def committed_items(w, want: int) -> None:
            deadline = time.monotonic() + 120
            while await asyncio.to_thread(committed_total, cfg, "trm-worker-items", ITEMS) < want:
                w.raise_if_failed()
                assert time.monotonic() < deadline, w.status()
                await asyncio.sleep(0.5)

        async def scenario():
            async with StreamWorker(settings) as w:
                await w.wait_ready(60)
                await asyncio.to_thread(publish_kind, cfg, "items", [events[i] for i in old], progress=False)
                await committed_items(w, len(old))
                broker.kill()
                await asyncio.to_thread(broker.restart, True, cfg)  # the worker keeps running
                deadline = time.monotonic() + 30
                while seen("the log now ends at") != {0, 1}:  # its fetches reached the new broker
                    assert time.monotonic() < deadline, f"shrunk logs seen: {sorted(seen('the log now ends at'))}"
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(publish_kind, cfg, "items", [events[i] for i in new + old], progress=False)
                await committed_items(w, len(ids))
                await asyncio.sleep(1)

        asyncio.run(scenario())
        tokens = FeastSink(feast_repo).read_online("item_tokens", new)
        missing = [i for i in new if not (tokens.get(i) or {}).get("gen_tokens")]
        print(f"\nread again on the running check: {sorted(seen('holds another record'))}; on the rejoin: "
              f"{sorted(seen('no committed offset'))}")
        assert not missing, f"{len(missing)} of the {len(new)} new items got no tokens"
        assert seen("holds another record") | seen("no committed offset") == {0, 1}
    finally:
        broker.stop()


def test_a_stale_commit_on_a_new_log_is_not_a_second_reset(feast_repo, tiny_tokenizer, ml_slice, tmp_path,  # noqa: F811
                                                           caplog):
    """A memory broker restarted and the worker read its new log from the beginning; then the group's
    offsets on the new broker are the old log's again, beyond the new log's end (a new broker that
    accepted a stale commit, while the worker's own commit after the reset was refused by a
    rebalance: `_retrying` then relies on the saved state). The record at each saved high-water mark
    is still the one the worker read, so the log is intact and the commit is stale: the worker
    resumes after its marks and commits that. Before, the end below the committed offset alone
    declared a second reset, and the new log's records were applied twice."""
    import logging

    from streams.broker import EmbeddedBroker
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import INTERACTIONS, topic_plan
    from streams.feast_sink import FeastSink
    from streams.publisher import publish_kind

    caplog.set_level(logging.WARNING, logger="streams.batch_loop")
    items, its = ml_slice
    inter = [InteractionEvent.from_interaction(i) for i in its]
    first, second = inter[:len(inter) // 2], inter[len(inter) // 2::4]  # the new log: shorter in every partition
    item_events = [ItemEvent.from_item(i) for i in items.values()]
    broker = EmbeddedBroker(storage="memory://tansu/", log_path=str(tmp_path / "tansu.log"))
    try:
        cfg, settings = _worker_on(broker, feast_repo, tiny_tokenizer, session_timeout_ms=6000)

        def run(events, want):  # a worker's life; the stale offsets wait for an exact count
            return _worker_run(cfg, settings, item_events, events, want, exact=True)

        run(first, len(first))
        old = _committed(cfg)
        broker.kill()
        broker.restart(True, cfg)
        publish_kind(cfg, "items", item_events, progress=False)
        publish_kind(cfg, "interactions", second, progress=False)
        size = _log_size(cfg, INTERACTIONS)
        assert run(None, size)["log_resets"] == topic_plan()[INTERACTIONS]
        new = _committed(cfg)
        assert all(old[p] > new[p] > 0 for p in old), (old, new)  # the stale offsets lie beyond every new log's end
        _commit(cfg, old)
        caplog.clear()
        st = run(None, size)
        users = sorted({i.user_id for i in its})
        applied = sum(r["user_n_events"] or 0 for r in FeastSink(feast_repo).read_online("user_history", users).values())
        assert st["log_resets"] == 0 and st["duplicates"] == 0 and st["dead_lettered"] == 0, st
        assert applied == len(first) + len(second), "the new log applied once"
        assert _committed(cfg) == new
        stale = _logged(caplog, cfg.topic(INTERACTIONS), "stale")
        assert stale == set(range(topic_plan()[INTERACTIONS])), [r.getMessage() for r in caplog.records]
    finally:
        broker.stop()


def _logged(caplog, topic: str, text: str) -> set[int]:
    """Partitions of `topic` that the worker's loops logged a message containing `text` for (the
    batch loop's messages name their TopicPartition first)."""
    return {int(r.args[0].partition) for r in caplog.records
            if text in r.getMessage() and r.args and getattr(r.args[0], "topic", None) == topic}


def _committed(cfg) -> dict[int, int]:
    """The worker's interactions group's committed offset per partition."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.contract.topics import INTERACTIONS

    c = KafkaConsumer(**cfg.kafka_python_kwargs(), group_id="trm-worker-interactions", enable_auto_commit=False)
    try:
        topic = cfg.topic(INTERACTIONS)
        return {p: c.committed(TopicPartition(topic, p)) for p in sorted(c.partitions_for_topic(topic))}
    finally:
        c.close()


def _commit(cfg, offsets: dict[int, int]) -> None:
    """Commit `offsets` for the worker's interactions group, as a member of it (Tansu refuses a
    member-less commit while the group has a generation)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.contract.topics import INTERACTIONS

    async def commit():
        c = AIOKafkaConsumer(group_id="trm-worker-interactions", enable_auto_commit=False,
                             session_timeout_ms=cfg.session_timeout_ms, **cfg.aiokafka_kwargs())
        await c.start()
        try:
            c.subscribe([cfg.topic(INTERACTIONS)])
            deadline = time.monotonic() + 60
            while len(c.assignment()) < len(offsets):  # joined, owning every partition
                assert time.monotonic() < deadline, "never joined the group"
                await c.getmany(timeout_ms=200)
            await c.commit({TopicPartition(cfg.topic(INTERACTIONS), p): off for p, off in offsets.items()})
        finally:
            await c.stop()

    asyncio.run(commit())


def _worker_run(cfg, settings, item_events, events, want: int, exact: bool = False) -> dict:
    """One worker's life: start it, publish the items and `events` (unless None), wait until its
    interactions group has committed `want` records (`_committed_up_to`), stop it; its interactions
    loop's status."""
    from streams.app import StreamWorker
    from streams.contract.topics import INTERACTIONS
    from streams.publisher import publish_kind

    async def run():
        async with StreamWorker(settings) as w:
            await w.wait_ready(60)
            if events is not None:
                await asyncio.to_thread(publish_kind, cfg, "items", item_events, progress=False)
                await asyncio.to_thread(publish_kind, cfg, "interactions", events, progress=False)
            await _committed_up_to(w, cfg, want, exact=exact)
            return w.status()[INTERACTIONS]

    return asyncio.run(run())


def _worker_on(broker, feast_repo, tiny_tokenizer, session_timeout_ms: int):
    """Start `broker` with the topics; the Kafka config and the settings of a worker on it."""
    from streams.app import WorkerSettings
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig

    broker.start()
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=session_timeout_ms)
    create_topics(cfg)
    return cfg, WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer, kafka=cfg, history_len=HISTORY_LEN,
                               retry_initial_s=0.2, retry_max_s=2.0, retry_budget_s=60)


async def _committed_up_to(w, cfg, want: int, timeout_s: float = 120, exact: bool = False) -> None:
    """Until the worker's interactions group has committed `want` records (`exact`: no more, no fewer),
    then 1 s more to settle."""
    from streams.contract.topics import INTERACTIONS

    deadline = time.monotonic() + timeout_s
    while (n := await asyncio.to_thread(committed_total, cfg, "trm-worker-interactions", INTERACTIONS)) < want or \
            (exact and n != want):
        w.raise_if_failed()
        assert time.monotonic() < deadline, w.status()
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)


def _log_size(cfg, topic: str) -> int:
    """Records in the topic now, counted by reading it (Tansu's end_offsets undercounts batches)."""
    from tests.test_streams_integration import consume_all

    return len(consume_all(cfg, topic, 10**9, timeout=5))

