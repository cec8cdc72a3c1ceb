"""Fault injection, worker crash: `trm worker` is killed with SIGKILL (by PID) in the middle of a
stream of N items and M interactions, then restarted. Nothing may be lost or double counted:
tokens online equal the tokenizer's, user histories and the point-in-time answers equal a
from-scratch computation, and the committed offsets cover every event.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fault_checks import assert_recovered, committed_total
from tests.stream_checks import HISTORY_LEN
from tests.streams_fixtures import ROOT

pytestmark = pytest.mark.integration
CHUNK = 100


def _start_worker(env, repo, tokenizer, log_path):
    """`trm worker` as a subprocess we can SIGKILL by PID; its output goes to `log_path`."""
    log = open(log_path, "a")
    p = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "trm.cli", "worker", "--repo", str(repo),
                          "--tokenizer", str(tokenizer), "--history-len", str(HISTORY_LEN)],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    p._log = log  # type: ignore[attr-defined]
    return p


def _status(repo):
    f = repo / "stream_state" / "status.json"
    try:
        return json.loads(f.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_kill_9_mid_stream_then_restart_loses_and_duplicates_nothing(broker, feast_repo, tiny_tokenizer,  # noqa: F811
                                                                     ml_slice, tmp_path):
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_kind
    from tokenizer.hybrid import HybridTokenizer

    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
    create_topics(cfg)
    items, its = ml_slice
    n, m = len(items), len(its)
    tok = HybridTokenizer.load(tiny_tokenizer)
    env = dict(os.environ, TRM_KAFKA_BOOTSTRAP=broker.bootstrap, TRM_KAFKA_SESSION_TIMEOUT_MS="6000")
    log_path = tmp_path / "worker.log"

    publish_kind(cfg, "items", [ItemEvent.from_item(i) for i in items.values()], progress=False)
    inter = [InteractionEvent.from_interaction(i) for i in its]
    w = _start_worker(env, feast_repo, tiny_tokenizer, log_path)
    killed_at, done = None, 0
    try:
        # interactions arrive in chunks while the worker runs; SIGKILL once some, not all, are in
        deadline = time.monotonic() + 120
        for k in range(0, m, CHUNK):
            publish_kind(cfg, "interactions", inter[k:k + CHUNK], progress=False)
            if killed_at is None:
                while time.monotonic() < deadline:
                    assert w.poll() is None, log_path.read_text()[-3000:]
                    done = _status(feast_repo).get("interactions", {}).get("processed", 0)
                    if done > 0 or k == 0:
                        break
                    time.sleep(0.1)
                if done > 0:
                    killed_at = _status(feast_repo)
                    os.kill(w.pid, signal.SIGKILL)
                    w.wait(timeout=10)
                    w._log.close()
            time.sleep(0.05)
        assert killed_at is not None, "the worker never processed an interaction before the stream ended"
        got = killed_at["interactions"]["processed"]
        assert 0 < got < m, killed_at
        assert w.returncode == -signal.SIGKILL

        w = _start_worker(env, feast_repo, tiny_tokenizer, log_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert w.poll() is None, log_path.read_text()[-3000:]
            if committed_total(cfg, "trm-worker-interactions", "interactions") == m and \
                    committed_total(cfg, "trm-worker-items", "items") == n:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"not caught up after restart: {_status(feast_repo)}\n{log_path.read_text()[-3000:]}")
        after = _status(feast_repo)
    finally:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
            w.wait(timeout=30)
        w._log.close()
    assert w.returncode == 0, log_path.read_text()[-3000:]

    # -- 0 lost: the restart handled exactly what was not committed; stores == from scratch
    st = after["interactions"]
    assert st["dead_lettered"] == 0 and st["parked"] == 0
    assert st["processed"] + st["skipped"] >= m - got  # the rest, plus any replayed (skipped) offsets
    assert_recovered(cfg, feast_repo, items, its, tok)
    print(f"\nkilled at {got}/{m} interactions processed; after restart: {st}")


def _wait_file(path, proc, log_path, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared: {log_path.read_text()[-3000:]}"
        time.sleep(0.05)


def test_kill_9_between_the_feast_write_and_the_commit(broker, feast_repo, tiny_tokenizer, ml_slice,  # noqa: F811
                                                       tmp_path):
    """The narrow window: rows are in Feast, nothing is produced, saved or committed yet. A failpoint
    (streams/failpoints.py) pauses the worker exactly there and the test kills it -9 by PID — first in
    the item agent, then (restarted) in the interaction agent. The replays must rewrite identical
    values: no loss, no double count, no duplicate row that changes a point-in-time answer."""
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig
    from streams.publisher import publish_kind
    from tokenizer.hybrid import HybridTokenizer

    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
    create_topics(cfg)
    items, its = ml_slice
    n, m = len(items), len(its)
    inter = [InteractionEvent.from_interaction(i) for i in its]
    fp_dir = tmp_path / "failpoints"
    base = dict(os.environ, TRM_KAFKA_BOOTSTRAP=broker.bootstrap, TRM_KAFKA_SESSION_TIMEOUT_MS="6000",
                TRM_FAILPOINT_DIR=str(fp_dir))
    log_path = tmp_path / "worker.log"
    kills = []
    publish_kind(cfg, "items", [ItemEvent.from_item(i) for i in items.values()], progress=False)
    w = None
    try:
        for point, publish in (("worker.items.after_feast_write", inter[:m // 2]),
                               ("worker.interactions.after_feast_write", inter[m // 2:])):
            w = _start_worker(dict(base, TRM_FAILPOINT=point), feast_repo, tiny_tokenizer, log_path)
            _wait_file(fp_dir / f"{point}.paused", w, log_path)
            kills.append((point, _status(feast_repo)))
            os.kill(w.pid, signal.SIGKILL)
            assert w.wait(timeout=10) == -signal.SIGKILL
            w._log.close()
            publish_kind(cfg, "interactions", publish, progress=False)  # arrives while the worker is down

        w = _start_worker(base, feast_repo, tiny_tokenizer, log_path)
        deadline = time.monotonic() + 120
        while committed_total(cfg, "trm-worker-interactions", "interactions") != m or \
                committed_total(cfg, "trm-worker-items", "items") != n:
            assert w.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not caught up: {_status(feast_repo)}"
            time.sleep(0.5)
        after = _status(feast_repo)
    finally:
        if w is not None and w.poll() is None:
            w.send_signal(signal.SIGTERM)
            w.wait(timeout=30)
            w._log.close()
    assert w.returncode == 0, log_path.read_text()[-3000:]
    # the item kill landed before anything was committed; the interaction kill after the items
    assert kills[0][1].get("items", {}).get("processed", 0) == 0
    assert kills[1][1].get("interactions", {}).get("processed", 0) == 0
    st = after["interactions"]
    assert st["dead_lettered"] == 0 and st["parked"] == 0
    # the killed batches' rows really are in the offline store twice (written, killed, replayed) ...
    import pyarrow.dataset as ds

    from streams.feast_sink import offline_dir

    hist = ds.dataset(offline_dir(feast_repo, "user_history")).to_table(columns=["user_id", "event_timestamp"])
    rows, distinct = hist.num_rows, hist.group_by(["user_id", "event_timestamp"]).aggregate([]).num_rows
    assert rows > distinct, "the replay should have rewritten the killed batch's rows"
    # ... and yet every answer equals the from-scratch one
    checked = assert_recovered(cfg, feast_repo, items, its, HybridTokenizer.load(tiny_tokenizer))
    print(f"\nkilled -9 at {[k for k, _ in kills]}; after the last restart: {st}; offline user_history rows "
          f"{rows} ({rows - distinct} rewritten by the replay); {checked} PIT rows checked")
