"""Fault injection, feature store down: the worker's online store (a real Redis, with an
append-only file as production runs it) is killed with SIGKILL while interactions keep arriving,
and restarted on the same port a few seconds later.

Promise under test (streams/batch_loop.py): a batch whose Feast write fails commits nothing; the
worker retries it in place with backoff from its last saved state, never dies, and once the store
is back the end state equals a from-scratch computation.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.fault_checks import assert_recovered, committed_total
from tests.services import RedisServer, restart_redis, start_redis
from tests.stream_checks import HISTORY_LEN

pytestmark = pytest.mark.integration


def redis_repo(work: Path, redis: RedisServer) -> Path:
    """The embedded feature repo with its online store switched to `redis` (registry stays local)."""
    import shutil

    from streams.feature_repo_tools import SOURCE_REPO, materialize_repo

    src = work.parent / f"{work.name}-source"
    shutil.copytree(SOURCE_REPO, src, ignore=shutil.ignore_patterns("data", "__pycache__"))
    yaml = (src / "feature_store.yaml").read_text()
    yaml = yaml.replace("online_store:\n  type: sqlite\n  path: data/online.db",
                        f"online_store:\n  type: redis\n  connection_string: 127.0.0.1:{redis.port}\n"
                        f"  skip_dedup: true")  # last write wins, as in deploy/feature_repo_prod
    assert "type: redis" in yaml
    (src / "feature_store.yaml").write_text(yaml)
    return materialize_repo(work, source=src)


def test_online_store_outage_commits_nothing_and_the_batch_is_retried(kafka_config, tiny_tokenizer, ml_slice,  # noqa: F811
                                                                    tmp_path):
    from streams.app import StreamWorker, WorkerSettings
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import INTERACTIONS
    from streams.publisher import publish_kind
    from tokenizer.hybrid import HybridTokenizer

    cfg = kafka_config
    items, its = ml_slice
    n, m = len(items), len(its)
    half = m // 2
    redis = start_redis(persistent=True)
    seen: dict = {"redis": redis}
    try:
        repo = redis_repo(tmp_path / "repo", redis)
        inter = [InteractionEvent.from_interaction(i) for i in its]

        async def scenario():
            settings = WorkerSettings(repo_path=repo, tokenizer_dir=tiny_tokenizer, kafka=cfg, history_len=HISTORY_LEN,
                                      retry_initial_s=0.2, retry_max_s=1.0, retry_budget_s=120)
            async with StreamWorker(settings) as w:
                await w.wait_ready(60)
                await asyncio.to_thread(publish_kind, cfg, "items",
                                        [ItemEvent.from_item(i) for i in items.values()], progress=False)
                await asyncio.to_thread(publish_kind, cfg, "interactions", inter[:half], progress=False)
                await w.wait_for(items=n, interactions=half, timeout=120)
                seen["before"] = await _until(lambda: committed_total(cfg, "trm-worker-interactions", INTERACTIONS),
                                              half)
                redis.kill()  # the online store goes away mid-stream (SIGKILL)
                t_down = time.monotonic()
                await asyncio.to_thread(publish_kind, cfg, "interactions", inter[half:], progress=False)
                loop = w.loops[INTERACTIONS]
                while loop.retries < 3:  # the worker keeps failing the batch and backing off
                    w.raise_if_failed()
                    assert time.monotonic() - t_down < 60, w.status()
                    await asyncio.sleep(0.1)
                seen["during"] = await asyncio.to_thread(committed_total, cfg, "trm-worker-interactions", INTERACTIONS)
                seen["status_during"] = w.status()[INTERACTIONS]
                await asyncio.sleep(2)
                # back, same port, data from its append-only file
                seen["redis"] = await asyncio.to_thread(restart_redis, redis)
                seen["down_s"] = time.monotonic() - t_down
                seen["after"] = await _until(lambda: committed_total(cfg, "trm-worker-interactions", INTERACTIONS), m,
                                             timeout=120, check=w.raise_if_failed)
                seen["recovered_s"] = time.monotonic() - t_down - seen["down_s"]
                seen["status"] = w.status()[INTERACTIONS]

        asyncio.run(scenario())
        during = seen["status_during"]
        assert seen["before"] == half
        assert seen["during"] == half, "offsets of the failed batch must not be committed"
        assert during["retries"] >= 3 and during["failing_since"] is not None
        assert seen["after"] == m
        st = seen["status"]
        assert st["dead_lettered"] == 0 and st["parked"] == 0 and st["failing_since"] is None
        checked = assert_recovered(cfg, repo, items, its, HybridTokenizer.load(tiny_tokenizer))
        print(f"\nRedis down {seen['down_s']:.1f} s; {during['retries']} retries while down, committed stayed at "
              f"{seen['during']}/{m}; caught up {seen['recovered_s']:.1f} s after Redis came back; "
              f"{checked} PIT rows checked")
    finally:
        seen["redis"].stop()


async def _until(get, want: int, timeout: float = 60.0, check=None) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(get)
        if got == want or time.monotonic() > deadline:
            return got
        if check is not None:
            check()
        await asyncio.sleep(0.3)
