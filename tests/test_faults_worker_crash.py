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
from datetime import timedelta

import pandas as pd
import pytest

from tests.streams_fixtures import ROOT, broker, feast_repo, ml_slice, tiny_tokenizer  # noqa: F401
from tests.test_streams_integration import HISTORY_LEN, assert_pit_row, consume_all, reference

pytestmark = pytest.mark.integration
CHUNK = 100


def _committed(cfg, group, topic):
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**cfg.kafka_python_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or {0})]
        return sum(c.committed(tp) or 0 for tp in tps)
    finally:
        c.close()


def _start_worker(env, repo, tokenizer, log_path):
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
    from streams.broker import create_topics
    from streams.events import InteractionEvent, ItemEvent
    from streams.feast_sink import FeastSink, to_utc
    from streams.publisher import publish_kind
    from tokenizer.hybrid import HybridTokenizer
    from trm.config import KafkaConfig

    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000)
    create_topics(cfg)
    items, its = ml_slice
    n, m = len(items), len(its)
    tok = HybridTokenizer.load(tiny_tokenizer)
    gen_of = {iid: t.gen_tokens for iid, t in zip(items, tok.encode_texts([i.text() for i in items.values()]))}
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
            if _committed(cfg, "trm-worker-interactions", "interactions") == m and \
                    _committed(cfg, "trm-worker-items", "items") == n:
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

    # -- 0 lost: nothing dead-lettered, the restart handled exactly what was not committed
    assert consume_all(cfg, "interactions.dlq", 1, timeout=3) == []
    assert consume_all(cfg, "items.dlq", 1, timeout=3) == []
    st = after["interactions"]
    assert st["dead_lettered"] == 0 and st["parked"] == 0
    assert st["processed"] + st["skipped"] >= m - got  # the rest, plus any replayed (skipped) offsets

    sink = FeastSink(feast_repo)
    # -- tokens online: exactly the tokenizer's
    online = sink.read_online("item_tokens", list(items))
    assert {iid: online[iid]["gen_tokens"] for iid in items} == gen_of
    assert all(online[i]["mem_tokens"] == t.mem_tokens for i, t in zip(items, tok.encode_items(list(items.values()))))
    # -- user histories and item counters online == from scratch
    users_tl, items_tl = reference(its, gen_of)
    online_u = sink.read_online("user_history", list(users_tl))
    assert {u: online_u[u] for u in users_tl} == {u: tl[-1][1] for u, tl in users_tl.items()}
    online_i = sink.read_online("item_stats", list(items_tl))
    assert {i: online_i[i] for i in items_tl} == {i: tl[-1][1] for i, tl in items_tl.items()}

    # -- point in time (offline, where a replayed batch wrote its rows twice): same answers
    sample = its[::11]
    edf = pd.DataFrame({"user_id": [i.user_id for i in sample], "item_id": [i.item_id for i in sample],
                        "event_timestamp": [to_utc(i.event_time) - timedelta(microseconds=1) for i in sample]})
    feats = ["user_history:hist_item_ids", "user_history:hist_gen_tokens", "user_history:user_n_events",
             "user_history:user_n_positives", "item_stats:item_n_interactions", "item_stats:item_n_positives",
             "item_tokens:gen_tokens"]
    hist = sink.store.get_historical_features(entity_df=edf, features=feats).to_df()
    assert len(hist) == len(edf)
    checked = 0
    for row in hist.itertuples(index=False):
        checked += assert_pit_row(row, users_tl, items_tl)
        assert list(row.gen_tokens) == gen_of[row.item_id]
    assert checked > len(sample) // 2
    print(f"\nkilled at {got}/{m} interactions processed; after restart: {st}")
