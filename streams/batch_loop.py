"""The worker's consumption loop: an aiokafka group consumer read in `getmany` batches.

Why not a plain Faust agent: measured on Tansu, a Faust agent that does nothing tops out at
~5 k events/s (its per-message path: Event objects, per-message ack/offset tracking, stream
buffering), and `group_by` + Table at ~1.3-2 k/s, while a raw aiokafka consumer reads ~187 k/s.
Batching also is what the work needs: one tokenizer call per item batch, one Feast write and one
parquet part per batch. So Faust hosts and supervises the worker (lifecycle, signals, logging:
`streams.app`), and each agent is this loop: getmany, then `BatchLoop._process_and_commit` — the
one statement of the order in which a batch's effects become durable, up to the explicit offset
commit (enable_auto_commit off). The processor runs in a dedicated thread, so heartbeats keep
flowing while the encoder or Feast run. Nothing is committed that has not been written to Feast:
at-least-once.

A failing batch (Feast's online store down, the broker gone while producing or committing) is
retried in place, with exponential backoff, until `retry_budget_s`:
  1. nothing of the failed attempt is committed (its offsets stay where they were);
  2. the processor drops its in-memory state and reopens what it last saved (`_reset_processor`),
     so the retry recomputes the batch from the same starting point — values written twice are
     identical, offsets <= a saved high-water mark are skipped;
  3. the same records are processed again (they stay in memory; the consumer does not re-fetch).
Past the budget the loop fails and the worker exits non-zero for its supervisor to restart; the
budget stays below `max_poll_interval_ms`, after which Kafka would hand the partitions to another
member anyway.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiokafka.errors import CommitFailedError

from streams.errors import StreamsError
from streams.failpoints import failpoint
from streams.kafka_config import KafkaConfig

from .dlq import SourceRecord
from .processor import Processor, record_mark

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    topic: str  # contract name, prefix added from the config
    group_id: str
    output_topic: str | None = None
    max_records: int = 5000
    poll_timeout_ms: int = 200
    # run the processor in a dedicated thread (heartbeats flow while a slow batch — the item
    # encoder — runs) or inline in the event loop (no thread hand-off for fast batches)
    threaded: bool = True
    # retry a failing batch in place: backoff doubles from retry_initial_s up to retry_max_s; give up
    # (fail the loop) once retry_budget_s has passed — below max_poll_interval_ms (300 s)
    retry_initial_s: float = 0.5
    retry_max_s: float = 15.0
    retry_budget_s: float = 240.0


@dataclass
class Counters:
    """What a worker reports: processed, dead-lettered, parked (waiting for item tokens)."""
    processed: int = 0
    dead_lettered: int = 0
    parked: int = 0
    skipped: int = 0  # offsets <= the saved high-water mark: applied before a restart
    duplicates: int = 0  # interactions already applied (same user, item, event time, label): no-ops
    folded: int = 0  # item-stats: events older than the compaction cutoff, counted in the base
    batches: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=dict)


# what `_retrying` says of a failing check of positions (`_positions`), rather than of a batch
_CHECK = {"meanwhile": "no record of these partitions applied meanwhile",
          "unless": "no record of these partitions was applied; a restarted worker checks them again"}


class RetryBudgetExceeded(StreamsError, RuntimeError):
    """A batch (or a check of positions) kept failing for longer than the retry budget; nothing of it
    was committed."""


async def _acquire_within(lock: asyncio.Lock, timeout_s: float) -> bool:
    """Acquire `lock` if it comes free within `timeout_s`; True if this call now holds it (also when it
    was acquired just as the wait ran out: asyncio.wait_for could drop that and leak the lock)."""
    task = asyncio.ensure_future(lock.acquire())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task in done:
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


class BatchLoop:
    """Runs a `Processor` (streams/processor.py) over batches of one topic, in one dedicated thread.
    A processor that parks has its parked records retried when `wake` is set and on idle polls."""

    def __init__(self, config: KafkaConfig, settings: LoopSettings, make_processor: Callable[[], Processor],
                 on_batch: Callable[[], None] | None = None, wake: asyncio.Event | None = None):
        self.config = config
        self.s = settings
        self.make_processor = make_processor
        self.on_batch = on_batch
        self.wake = wake
        self.counters = Counters()
        self.processor: Processor | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"trm-{settings.topic}")
        self.consumer = None
        self.producer = None
        self._lock = asyncio.Lock()
        # bumped by every rebalance callback: a batch fetched under an older epoch is fetched again
        # (`_refetch`), since positions may have moved (`_moved`: where `_positions` put a partition)
        self._epoch = 0
        self._moved: dict = {}
        # partition -> (the offset after the last record fetched since the last rebalance, that record's
        # `record_mark`): a log that now ends below it, or a fetch that starts below it, may have been
        # replaced under the running loop, and the record the log holds there tells (`_log_moved`)
        self._fetched: dict = {}
        self._shrunk: set = set()  # partitions a fetch response said end before `_fetched` (`_log_moved`)
        # assigned partitions whose check on assignment failed: none of their records is applied before
        # the loop has checked them (`_check_unchecked`); `_reset_in_check`: those the failed check reset
        self._unchecked: set = set()
        self._reset_in_check: dict = {}
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # set once partitions are assigned
        self.committed: dict[int, int] = {}  # partition -> offset committed by this loop
        self.produced: dict[int, int] = {}  # output partition -> end of what this loop produced (acked)
        self.idle_stop: asyncio.Future | None = None  # see stop(when_idle=True)
        self.error: BaseException | None = None
        self.retries = 0  # failed attempts retried so far (all batches)
        self.log_resets = 0  # partitions whose log was found replaced by a new one (see _positions)
        self.on_log_reset: Callable[[], None] | None = None
        self.failing_since: float | None = None  # wall clock of the first failure of the current batch
        # called after each batch is committed: (its seconds, its records' Kafka timestamps in ms) (streams/metrics.py)
        self.on_timed: Callable[[float, list[int]], None] | None = None

    async def _in_thread(self, fn, *args):
        if not self.s.threaded:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.abc import ConsumerRebalanceListener

        self.processor = await self._in_thread(self.make_processor)
        topic = self.config.topic(self.s.topic)
        loop_self = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                async with loop_self._lock:  # never in the middle of a batch
                    loop_self._epoch += 1
                    loop_self._fetched.clear()
                    loop_self._shrunk.clear()
                    loop_self._unchecked.difference_update(revoked)
                    for tp in revoked:
                        loop_self.committed.pop(tp.partition, None)
                    await loop_self._in_thread(loop_self.processor.revoke, [tp.partition for tp in revoked])

            async def on_partitions_assigned(self, assigned):
                # Not in the middle of a batch, and no batch fetched meanwhile is processed before the
                # positions are checked (one processed with the stale high-water mark skipped a replaced
                # log's first records as already applied); such a batch is fetched again (`_refetch`).
                # The wait for a batch in progress is bounded: heartbeats stop during this callback, and
                # a batch retrying past the session timeout would get this worker evicted.
                locked = await _acquire_within(loop_self._lock, loop_self.config.session_timeout_ms / 2000)
                if not locked:
                    log.warning("partitions assigned while a batch is still retrying: checking positions beside it")
                try:
                    loop_self._epoch += 1
                    loop_self._fetched.clear()
                    loop_self._shrunk.clear()
                    loop_self._unchecked, loop_self._reset_in_check = set(assigned), {}
                    try:
                        await loop_self._assign_and_check(topic, loop_self._unchecked)
                    except Exception as exc:  # aiokafka would log it and fetch from unchecked positions
                        log.warning("checking the positions of %s failed (%r): none of their records is applied "
                                    "until a retry of the check succeeds", sorted(assigned), exc)
                finally:
                    if not locked:  # a batch fetched while positions were checked beside it: fetched again
                        loop_self._epoch += 1
                        loop_self._fetched.clear()
                        loop_self._shrunk.clear()
                    else:
                        loop_self._lock.release()
                if assigned:
                    loop_self.ready.set()

        kw = self.config.aiokafka_kwargs()
        self.consumer = AIOKafkaConsumer(
            group_id=self.s.group_id, enable_auto_commit=False, auto_offset_reset="earliest",  # see _positions
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.config.session_timeout_ms // 4),
            max_poll_interval_ms=300_000, fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024, **kw)
        self.consumer.subscribe([topic], listener=Listener())
        self.producer = AIOKafkaProducer(acks="all", linger_ms=5, max_batch_size=512 * 1024, **kw)
        await self.producer.start()
        await self.consumer.start()
        try:
            while not self._stopping.is_set():
                epoch = self._epoch
                batches = await self.consumer.getmany(timeout_ms=self.s.poll_timeout_ms,
                                                      max_records=self.s.max_records)
                if not batches and self.idle_stop is not None:
                    break  # asked to stop when idle: nothing new in any owned partition
                async with self._lock:
                    if self._epoch != epoch:  # a rebalance since the fetch: positions may have moved
                        self._refetch(batches)
                        continue
                    if self._unchecked:
                        await self._check_unchecked(topic)
                        self._refetch(batches)
                        continue
                    if await self._log_moved(batches):
                        if self.on_batch is not None:
                            self.on_batch()  # the status file shows the resets now, not after the next batch
                        continue
                    for tp, msgs in batches.items():
                        self._moved.pop(tp, None)
                        if msgs:  # where it read to, and the last record's fingerprint
                            self._fetched[tp] = (msgs[-1].offset + 1, record_mark(msgs[-1].key, msgs[-1].value))
                    records = [SourceRecord(topic, tp.partition, m.offset, m.key, m.value)
                               for tp, msgs in batches.items() for m in msgs]
                    if records:
                        ends = {tp.partition: msgs[-1].offset + 1 for tp, msgs in batches.items() if msgs}
                        span = ", ".join(f"p{tp.partition}@{msgs[0].offset}-{msgs[-1].offset}"
                                         for tp, msgs in batches.items() if msgs)
                        t0 = time.perf_counter()
                        await self._retrying(lambda: self._process_and_commit(topic, records, ends),
                                             f"batch of {len(records)} records from {topic} ({span})")
                        if self.on_timed is not None:
                            self.on_timed(time.perf_counter() - t0, [m.timestamp for msgs in batches.values()
                                                                     for m in msgs])
                    if self.processor.parks and (not records or self._woken()):
                        await self._retrying(lambda: self._process_and_commit(topic, None, {}),
                                             f"retry of parked records from {topic}")
                    if self.on_batch is not None:
                        self.on_batch()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            log.exception("stream loop for %s failed; offsets of the failed batch were not committed", topic)
            raise
        finally:
            if self.idle_stop is not None and not self.idle_stop.done():
                self.idle_stop.set_result(None)
            await self._close()

    async def _log_moved(self, batches) -> bool:
        """True (the batch dropped, its partitions fetched again) when a partition's log may have been
        replaced under the running loop; its records are then checked before any is applied, as on
        assignment (`_positions`: the end offsets and the record at the mark).

        Two signs, per partition, against what this loop fetched since the last rebalance (`_fetched`):
          1. its fetch went back without this loop seeking: a consumer resets a position past the end
             of the log by itself (auto_offset_reset); checked at once, with what it had read as the
             least end an intact log has;
          2. a fetch response said the log ends before what it had read (the high watermark). Tansu
             answers a fetch past the end with nothing, so a memory broker restarted under the worker
             shows this, and the consumer waits at its old position until the new log outgrows it;
             a real Kafka's new leader may also lag for a moment. Neither alone is proof, so the
             partition's next records are checked before they are applied: a replaced log holds
             another record at the saved high-water mark (its fingerprint differs), a lagging leader's
             log holds the same one.
        A loop without saved state (items) has no saved mark: the last record it read stands in for it
        (`read`), so a lagging leader is not read again from the beginning, and a new log is.
        Left alone, the worker would apply a new log's records above the old high-water mark as if they
        continued the old log, and the check on the next assignment would come too late, after the
        mark had moved onto the new log."""
        hw = self.consumer.highwater
        moved, floor, read = {}, {}, {}
        for tp, (end, mark) in self._fetched.items():
            msgs, h = batches.get(tp), hw(tp)
            if msgs and msgs[0].offset < end:
                moved[tp] = f"the fetch went back from offset {end} to {msgs[0].offset} without a seek"
                floor[tp], read[tp] = end, (end - 1, mark)
            elif msgs and tp in self._shrunk:
                moved[tp] = f"records again after the log had ended before offset {end}"
                floor[tp], read[tp] = end, (end - 1, mark)
            elif h is not None and h < end and tp not in self._shrunk:
                log.warning("%s: the log now ends at %d, before offset %d this worker already read: its next "
                            "records are checked before they are applied", tp, h, end)
                self._shrunk.add(tp)
        if not moved:
            return False
        for tp, why in moved.items():
            log.warning("%s: %s: checking whether the log was replaced", tp, why)
            self._fetched.pop(tp)
            self._shrunk.discard(tp)
        done: dict = {}  # kept across the check's retries
        await self._retrying(lambda: self._positions(list(moved), floor, done, read),
                             f"check of the log of {sorted(moved)}", **_CHECK)
        self._refetch(batches)
        return True

    async def _assign_and_check(self, topic: str, tps: set) -> None:
        """The processor opens the partitions' state, and their positions are checked (`_positions`);
        then none of `tps` is left unchecked. Partitions an earlier attempt reset are not reset again."""
        self.processor.set_partition_count(len(self.consumer.partitions_for_topic(topic) or ()))
        await self._in_thread(self.processor.assign, [tp.partition for tp in tps])
        await self._positions(sorted(tps), done=self._reset_in_check)
        tps.clear()

    async def _check_unchecked(self, topic: str) -> None:
        """`_assign_and_check` of partitions whose check failed in the rebalance callback, retried
        (`_retrying`) before any of their records is applied."""
        self._unchecked &= self.consumer.assignment()
        await self._retrying(lambda: self._assign_and_check(topic, self._unchecked),
                             f"check of the positions of {sorted(self._unchecked)}", **_CHECK)

    def _refetch(self, batches) -> None:
        """Drop a batch fetched before a rebalance and fetch its partitions again, from its first offset
        or from where `_positions` moved the partition, whichever is earlier (records at or below the
        high-water mark are skipped by the processor, so reading back too far costs only a re-read)."""
        owned = self.consumer.assignment()
        for tp, msgs in batches.items():
            if msgs and tp in owned:
                self.consumer.seek(tp, min(msgs[0].offset, self._moved.get(tp, msgs[0].offset)))

    async def _positions(self, assigned, floor: dict | None = None, done: dict | None = None,
                         read: dict | None = None) -> None:
        """Where newly assigned partitions start, and whether their log is still the one we read.

          1. Normally: the group's committed offset, else (nothing committed, no saved state) the
             beginning of the log (auto_offset_reset=earliest).
          2. Sanity check: an intact log ends at or past both the committed offset and the saved
             high-water mark + 1 (a log never shrinks), and holds at the high-water mark the record
             saved with it (its fingerprint, `processor.record_mark`; state files of older code have
             none). If it ends before either, or holds another record there, the log is new — a
             broker with memory storage restarted (it may even have accepted a stale commit from us
             after the restart, or grown past our positions before we looked), or the topic was
             recreated. Then the high-water mark is void (`processor.log_reset`), the new log is read
             from its beginning, `log_resets` counts it and `on_log_reset` lets the token cache
             rewind too.
             Where the record at the mark is the one this worker read and the log reaches past it,
             the log is intact up to the mark whatever else says it ended earlier: a committed offset
             beyond its end is stale (a new broker accepted the old log's commit, and this worker's
             own commit after its reset was refused by a rebalance), and so is what a running loop
             read beyond it (a lagging leader). Resume after the record (hwm + 1, or after the last
             record read for a loop without saved state: `read`) and commit that, never past a parked
             record (a second reset would re-read the whole new log and report events lost that were not).
          3. Nothing committed but saved state up to `hwm` (the broker lost the group's offsets):
             resume at hwm + 1 (records already fetched from below it are skipped by the processor),
             and commit that, so the group's offsets match the state before any new record arrives.
        `read`: a running loop's last record read, (offset, `record_mark`), per partition it checks: where
        no trusted saved mark exists (the stateless items loop), the record the log holds there decides
        instead, as a saved mark would (a lagging leader's log holds the same one, a new log another).
        `done`: partitions an earlier attempt of the same check already reset, with the new log's
        beginning where known (a retry does not reset them twice: `log_resets` and `on_log_reset` count
        a replaced log once, and it commits their beginnings); a reset adds to it.
        Undetectable: a new log that holds, at the old high-water mark, a record of the same key and
        value; a state file written before the fingerprint, or whose fingerprint may be stale (none
        trusted: the end-offset check alone; docs/faults.md names the one stale case that passes); a
        record at the mark not read within 3 s or removed (a warning, then the end offsets alone); and a
        new log that had already outgrown a running worker's position when it first fetched from it
        (this runs on assignment, and for a running worker whose log ended before what it read, or whose
        fetch went back: `_log_moved`; `floor`: what it read, the least end of an intact log)."""
        done = {} if done is None else done
        tps = [tp for tp in assigned if tp not in done]
        resume: dict = {}
        for tp in (tp for tp in assigned if tp in done):  # reset by an earlier attempt: commit its beginning
            if done[tp] is None and await self.consumer.seek_to_beginning(tp):
                done[tp] = await self.consumer.position(tp)
            if done[tp] is not None:
                resume[tp] = done[tp]
        committed = {tp: await self.consumer.committed(tp) for tp in tps}
        hwm = {tp: self.processor.hwm(tp.partition) for tp in tps}
        marks = {tp: self.processor.hwm_mark(tp.partition) for tp in tps}
        need = {tp: max(committed[tp] or 0, hwm[tp] + 1, (floor or {}).get(tp, 0)) for tp in tps}
        check = [tp for tp in tps if need[tp] > 0]
        probe = {tp: hwm[tp] for tp in check if hwm[tp] >= 0 and marks[tp] is not None}
        for tp, (off, mark) in (read or {}).items():
            if tp in check and tp not in probe and off >= 0:  # no saved mark: the last record read stands in
                probe[tp], marks[tp] = off, mark
        ends, found = await self._log_ends(check, probe) if check else ({}, {})
        for tp in check:
            other = tp in found and found[tp] != marks[tp]  # another record at the high-water mark
            same = tp in found and not other  # the record this worker read there: intact up to the mark
            after = probe[tp] + 1 if same else hwm[tp] + 1  # where this worker's log goes on
            if (ends[tp] < need[tp] and not same) or other:
                why = (f"holds another record at offset {probe[tp]} than the one this worker read there" if other else
                       f"ends at {ends[tp]}, before what this worker already read (committed {committed[tp]}, "
                       f"saved high-water mark {hwm[tp]})")
                log.error("%s: the log %s: the broker lost its log (memory storage restarted, or the topic was "
                          "recreated). Reading the new log from its beginning; events the old broker held that "
                          "were not processed yet are lost.", tp, why)
                if hwm[tp] >= 0:
                    await self._in_thread(self.processor.log_reset, tp.partition)
                self.committed.pop(tp.partition, None)
                self.log_resets += 1
                done[tp] = None
                if self.on_log_reset is not None:
                    self.on_log_reset()
                self._moved[tp] = 0
                if await self.consumer.seek_to_beginning(tp):  # False: not answered within the request timeout
                    # the old log's offset, if still committed, is void: commit the new log's beginning
                    done[tp] = resume[tp] = await self.consumer.position(tp)
            elif ends[tp] < need[tp] or committed[tp] is None:
                if committed[tp] is not None:  # `same`: the log holds the mark's record, ends before the rest
                    log.warning("%s: the log ends at %d, before the committed offset %s or what this worker read, "
                                "but holds the record this worker read at offset %d: that offset is stale (the log "
                                "is intact); resuming after it", tp, ends[tp], committed[tp], after - 1)
                else:
                    log.warning("%s: no committed offset; resuming after offset %d (saved high-water mark %d)",
                                tp, after - 1, hwm[tp])
                self.consumer.seek(tp, after)
                self._moved[tp] = after
                if after > 0:  # never past a parked record (nor a negative one: parked before a reset)
                    safe = await self._in_thread(self.processor.commit_positions, {tp.partition: after})
                    off = min(after, safe.get(tp.partition, after))
                    if off >= 0:
                        resume[tp] = off
        if resume:  # the group's offsets catch up with the state (else they stay as they are until new records)
            try:
                await self.consumer.commit(resume)
                self.committed.update({tp.partition: off for tp, off in resume.items()})
            except Exception as exc:  # not a member yet (a running check after a broker restart): on assignment
                log.info("committing the resumed positions %s failed (%r); the next assignment commits them",
                         {tp.partition: off for tp, off in resume.items()}, exc)

    async def _log_ends(self, tps, probe: dict | None = None) -> tuple[dict, dict]:
        """The partitions' end offsets, exactly: the high watermarks of a fetch response (Tansu's
        ListOffsets answers with the base offset of the last record batch + 1, an undercount); and,
        for the partitions in `probe` (tp -> offset) whose log reaches that offset, the `record_mark`
        of the record there. A partition whose record was not read within 3 s, or was removed (compaction,
        retention), has no mark (a warning says so)."""
        from aiokafka import AIOKafkaConsumer

        reader = AIOKafkaConsumer(enable_auto_commit=False, max_partition_fetch_bytes=64 * 1024,
                                  auto_offset_reset="earliest", **self.config.aiokafka_kwargs())
        await reader.start()
        try:
            reader.assign(tps)
            for tp in tps:
                reader.seek(tp, 0)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and any(reader.highwater(tp) is None for tp in tps):
                await reader.getmany(*tps, timeout_ms=300, max_records=1)
            ends = {tp: reader.highwater(tp) or 0 for tp in tps}  # None after 3 s: an empty log
            want = {tp: off for tp, off in (probe or {}).items() if off < ends[tp]}
            found: dict = {}
            for tp, off in want.items():
                reader.seek(tp, off)
            gone: set = set()  # the first record read lies past the mark: compaction or retention removed it
            deadline = time.monotonic() + 3.0
            while want.keys() - found.keys() - gone and time.monotonic() < deadline:
                batch = await reader.getmany(*(want.keys() - found.keys() - gone), timeout_ms=300, max_records=64)
                for tp, msgs in batch.items():
                    for m in msgs:
                        if tp in found or tp in gone:
                            continue
                        if m.offset == want[tp]:
                            found[tp] = record_mark(m.key, m.value)
                        elif m.offset > want[tp]:
                            gone.add(tp)
            for tp in want.keys() - found.keys():
                log.warning("%s: the record at the saved high-water mark %d %s; only the log's end offset tells "
                            "whether the log was replaced", tp, want[tp],
                            "was removed (compaction or retention)" if tp in gone else "could not be read within 3 s")
            return ends, found
        finally:
            await reader.stop()

    async def _retrying(self, attempt: Callable[[], Awaitable[None]], what: str,
                        meanwhile: str = "offsets not committed",
                        unless: str = "its offsets were not committed, a restarted worker replays it") -> None:
        """Run `attempt` until it succeeds, with backoff; the retry steps are in the module docstring.
        `meanwhile` / `unless`: what holds while it fails / after the loop gives up (a batch's by default)."""
        delay, start, n = self.s.retry_initial_s, time.monotonic(), 0
        while True:
            try:
                await attempt()
                if n:
                    log.warning("%s succeeded after %d retries (%.1f s)", what, n, time.monotonic() - start)
                self.failing_since = None
                return
            except asyncio.CancelledError:
                raise
            except CommitFailedError as exc:
                # the group moved on (rebalance, or a restarted broker forgot this member): the batch's
                # effects and high-water mark are saved, so the next owner of these partitions
                # resumes correctly without this commit; retrying it would block the rejoin
                log.warning("%s: offset commit refused after a group change (%s); the partitions' next "
                            "assignment resumes from the saved state", what, exc)
                self.failing_since = None
                return
            except Exception as exc:
                n += 1
                elapsed = time.monotonic() - start
                if self.failing_since is None:
                    self.failing_since = time.time()
                if self._stopping.is_set() or elapsed + delay > self.s.retry_budget_s:
                    raise RetryBudgetExceeded(
                        f"{what} still failing after {n} attempts in {elapsed:.0f} s (last error: {exc!r}); "
                        f"{unless}") from exc
                self.retries += 1
                log.warning("%s failed (attempt %d: %r); %s; retrying in %.1f s", what, n, exc, meanwhile, delay)
                if self.on_batch is not None:
                    self.on_batch()  # the status file shows the retries while the outage lasts
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.s.retry_max_s)
                await self._in_thread(self._reset_processor)

    def _reset_processor(self) -> None:
        """Step 2 of a retry: forget unsaved in-memory state, reopen the last saved state."""
        self.processor.reset()

    def _woken(self) -> bool:
        if self.wake is not None and self.wake.is_set():
            self.wake.clear()
            return True
        return False

    async def _process_and_commit(self, topic: str, records: list[SourceRecord] | None,
                                  ends: dict[int, int]) -> None:
        """One batch, from its records to its offset commit: the only statement of the order in
        which its effects become durable (each step starts once the one before has succeeded; any
        failure raises to `_retrying`, which retries the whole method: nothing of the failed attempt
        is committed). `records` None: a retry of the parked records (`processor.parks` only).

          1. process, in the processor thread: skip offsets <= the saved high-water mark, decode
             (bad records become dead letters), compute, and write Feast online + offline (and any
             pair files); the processor returns once its writes are flushed — first, so nothing
             is committed that is not in Feast
          2. failpoint `worker.<topic>.after_feast_write` (when something was applied or dead-lettered)
          3. produce the outputs and the dead letters, and await every ack: a failed send raises
          4. save the processor's state and high-water marks (one SQLite transaction per
             partition) — only once the outputs are acknowledged, since a replay skips offsets
             <= hwm and so would not produce them again
          5. count (the status counters)
          6. commit offsets — last, so a committed offset is never ahead of the saved state: the
             batch's ends, or for a processor that parks, per partition only up to its first
             parked offset (`processor.commit_positions`)
        A retry of parked records that applied and dead-lettered nothing saves and commits nothing."""
        from aiokafka.structs import TopicPartition

        p = self.processor
        # 1. process: decode, compute, write Feast
        if records is None:
            res = await self._in_thread(p.retry_parked)
        else:
            res = await self._in_thread(p.process, records)
        wrote = bool(res.applied or res.dead)
        # 2. Feast written; nothing produced, saved or committed yet
        if wrote:
            failpoint(f"worker.{self.s.topic}.after_feast_write")
        # 3. produce outputs + dead letters, await their acks
        futs = []
        if res.outputs and self.s.output_topic:
            out_topic = self.config.topic(self.s.output_topic)
            send = self.producer.send
            futs += [await send(out_topic, key=k, value=v) for k, v in res.outputs]
        n_out = len(futs)
        for d in res.dead:
            futs.append(await self.producer.send(d.dlq_topic, key=d.record.key, value=d.record.value,
                                                 headers=d.headers()))
            kind = d.reason_kind(d.reason)
            self.counters.dlq_reasons[kind] = self.counters.dlq_reasons.get(kind, 0) + 1
        if futs:
            acks = await asyncio.gather(*futs)  # raises if any send failed: then nothing is committed
            produced = self.produced
            for md in acks[:n_out]:
                if md.offset >= produced.get(md.partition, 0):
                    produced[md.partition] = md.offset + 1
        # 4. save state + high-water marks
        if records is not None or wrote:
            await self._in_thread(p.save, res.hwm, res.marks)
        # 5. count
        c = self.counters
        c.processed += res.applied
        c.dead_lettered += len(res.dead)
        c.skipped += res.skipped
        c.duplicates += res.duplicates
        c.folded += res.folded
        c.parked = p.n_parked()
        if records is not None:
            c.batches += 1
        # 6. commit offsets (up to the first parked one)
        if records is None and not wrote:
            return
        todo = {TopicPartition(topic, part): off for part, off in p.commit_positions(ends).items()
                if off > self.committed.get(part, -1)}
        if todo:
            await self.consumer.commit(todo)
            for tp, off in todo.items():
                self.committed[tp.partition] = off

    def lag(self) -> dict[int, int]:
        """Per owned partition: its high watermark (as the last fetch reported it) - the committed offset."""
        c = self.consumer
        if c is None:
            return {}
        out = {}
        for tp in c.assignment():
            hw = c.highwater(tp)
            if hw is not None:
                out[tp.partition] = max(0, hw - self.committed.get(tp.partition, 0))
        return out

    def owned(self) -> set[int]:
        """Partitions of the input topic this loop owns now."""
        return {tp.partition for tp in self.consumer.assignment()} if self.consumer is not None else set()

    def stop(self, when_idle: bool = False) -> None:
        """Stop after the current batch; with `when_idle`, only once a poll finds nothing new (the
        `idle_stop` future is done then, or when the loop ends otherwise)."""
        if when_idle:
            if self.idle_stop is None:
                self.idle_stop = asyncio.get_running_loop().create_future()
            return
        self._stopping.set()

    async def _close(self) -> None:
        for c in (self.consumer, self.producer):
            if c is not None:
                try:
                    await c.stop()
                except Exception:  # closing after a broker loss must not mask the real error
                    log.warning("closing a Kafka client failed", exc_info=True)
        if self.processor is not None:
            await self._in_thread(self.processor.close)
        self.executor.shutdown(wait=True)
