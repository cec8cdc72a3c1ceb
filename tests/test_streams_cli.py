"""The streaming commands as an operator runs them: `trm broker`, `trm publish --file`, `trm worker`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.streams_fixtures import ROOT

pytestmark = pytest.mark.integration


def trm(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "trm.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def test_broker_refuses_a_taken_port_with_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = trm("broker", "--port", str(port), timeout=30)
    assert p.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in p.stderr


def test_publish_file_then_worker_subprocess(broker, feast_repo, tiny_tokenizer, ml_slice, tmp_path):  # noqa: F811
    from streams.feast_sink import FeastSink
    from tokenizer.hybrid import HybridTokenizer

    items, its = ml_slice
    items_file, inter_file = tmp_path / "items.jsonl", tmp_path / "interactions.jsonl"
    with open(items_file, "w") as fh:
        for it in items.values():
            fh.write(json.dumps({"item_id": it.item_id, "title": it.title, "text": it.text(),
                                 "categories": list(it.genres), "created_at": it.created_at,
                                 "event_time": it.created_at}) + "\n")
    with open(inter_file, "w") as fh:
        for i in its:
            fh.write(json.dumps({"request_id": f"r{i.user_id}-{i.item_id}", "user_id": i.user_id,
                                 "item_id": i.item_id, "label": i.label, "event_time": i.event_time}) + "\n")
    env = dict(os.environ, TRM_KAFKA_BOOTSTRAP=broker.bootstrap, TRM_KAFKA_SESSION_TIMEOUT_MS="6000")
    p = trm("publish", "items", "--file", str(items_file), "--quiet", env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"published {len(items)} items events" in p.stdout and "all acknowledged" in p.stdout
    p = trm("publish", "interactions", "--file", str(inter_file), "--quiet", env=env, timeout=60)
    assert p.returncode == 0 and f"published {len(its)} interactions events" in p.stdout, p.stderr

    log = open(tmp_path / "worker.log", "w")
    w = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "trm.cli", "worker", "--repo", str(feast_repo),
                          "--tokenizer", str(tiny_tokenizer)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    status_file = feast_repo / "stream_state" / "status.json"
    try:
        deadline = time.monotonic() + 120
        st = {}
        while time.monotonic() < deadline:
            assert w.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            if status_file.exists():
                st = json.loads(status_file.read_text())
                if st.get("items", {}).get("processed") == len(items) and \
                        st.get("interactions", {}).get("processed") == len(its):
                    break
            time.sleep(0.3)
        else:
            pytest.fail(f"worker did not finish: {st}\n{(tmp_path / 'worker.log').read_text()[-3000:]}")
    finally:
        w.send_signal(signal.SIGTERM)
        rc = w.wait(timeout=30)
        log.close()
    assert rc == 0, (tmp_path / "worker.log").read_text()[-3000:]
    tok = HybridTokenizer.load(tiny_tokenizer)
    first = list(items.values())[:20]
    online = FeastSink(feast_repo).read_online("item_tokens", [i.item_id for i in first])
    assert [online[i.item_id]["gen_tokens"] for i in first] == [t.gen_tokens for t in tok.encode_items(first)]


def test_publisher_never_reports_success_for_unacknowledged_sends():
    from streams.broker import EmbeddedBroker
    from streams.contract.events import InteractionEvent
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig
    from streams.publisher import PublishError, make_producer, publish_kind

    b = EmbeddedBroker().start()
    cfg = KafkaConfig(bootstrap_servers=b.bootstrap)
    create_topics(cfg)
    prod = make_producer(cfg, request_timeout_ms=1500, max_block_ms=1500, delivery_timeout_ms=3000)
    evs = [InteractionEvent(f"r{i}", 1, 2, 1, 100 + i) for i in range(20)]
    try:
        assert publish_kind(cfg, "interactions", evs[:5], progress=False, producer=prod).sent == 5
        b.stop()  # the broker goes away: nothing more can be acknowledged
        with pytest.raises(PublishError, match="20 of 20 records to interactions were not acknowledged"):
            publish_kind(cfg, "interactions", evs, progress=False, producer=prod)
    finally:
        prod.close(timeout=1)
        b.stop()
