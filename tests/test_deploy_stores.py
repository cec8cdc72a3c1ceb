"""The production stores for real: Redis online store + Feast SQL registry on PostgreSQL, run
natively (tests/services.py), with the project's own feature definitions and the production
feature_store.yaml assembled exactly as the init job does (deploy/bootstrap.py).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the shared fixture modules
from tests.services import INSTALL_HINT, ServiceError, start_postgres, start_redis
from trm import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "deploy"))
import bootstrap  # noqa: E402

HEALTHCHECK = REPO_ROOT / "deploy" / "healthcheck.py"
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _redis_cmd(server, *words: str) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall((" ".join(words) + "\r\n").encode())
        return s.recv(4096)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.integration
def test_native_services_start_listen_on_loopback_and_stop_by_pid():
    redis = start_redis()
    pg = start_postgres(dbname="trm_probe")
    try:
        assert redis.ping()
        assert _redis_cmd(redis, "CONFIG", "GET", "bind").count(b"127.0.0.1") == 1
        assert _redis_cmd(redis, "CONFIG", "GET", "save").endswith(b"$0\r\n\r\n"), "no RDB snapshots"
        assert pg.psql("SELECT current_database()") == "trm_probe"
        assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
        assert pg.psql("SHOW port") == str(pg.port)
    finally:
        redis.stop()
        pg.stop()
    assert redis.proc.poll() is not None and not _pid_alive(pg.pid)
    assert not redis.dir.exists() and not pg.root.exists(), "temp dirs are removed"


def test_missing_binaries_name_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServiceError, match="make system-deps"):
        start_redis()
    monkeypatch.setenv("TRM_PG_BINDIR", "/nonexistent/bin")
    with pytest.raises(ServiceError, match="make system-deps"):
        start_postgres()
    assert "make system-deps" in INSTALL_HINT


def test_production_repo_uses_the_embedded_definitions_and_project():
    prod = yaml.safe_load((REPO_ROOT / "deploy" / "feature_repo_prod" / "feature_store.yaml").read_text())
    embedded = yaml.safe_load((REPO_ROOT / "feature_repo" / "feature_store.yaml").read_text())
    assert prod["project"] == embedded["project"], "trainer/eval code and dashboards address one project"
    assert prod["online_store"]["type"] == "redis"
    assert prod["registry"]["registry_type"] == "sql"
    assert prod["registry"]["path"].startswith("postgresql+psycopg://")
    assert prod["entity_key_serialization_version"] == embedded["entity_key_serialization_version"]
    assert prod["offline_store"]["type"] == embedded["offline_store"]["type"]
    assert not list((REPO_ROOT / "deploy" / "feature_repo_prod").glob("*.py")), \
        "definitions live in feature_repo/ only; deploy/ holds just the production yaml"


@pytest.fixture
def prod_repo(feast_prod_env, tmp_path):
    """The production repo assembled + `feast apply`d (CLI) against native Redis and Postgres."""
    repo = bootstrap.assemble_feature_repo(tmp_path / "feature_repo_prod")
    bootstrap.feast_apply(repo)
    return repo


@pytest.mark.integration
def test_feast_apply_and_online_round_trip_on_redis_and_postgres(prod_repo, postgres_server, redis_server,
                                                                  feast_prod_env):
    import pandas as pd
    from feast import FeatureStore
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.infra.registry.sql import SqlRegistry

    # the registry lives in Postgres (the init job's apply is visible to every other process)
    db = feast_prod_env["FEAST_REGISTRY_DB"]
    views = postgres_server.psql("SELECT string_agg(feature_view_name, ',' ORDER BY feature_view_name) "
                                 "FROM feature_views WHERE project_id = 'trm'", db=db)
    assert views == "item_stats,item_tokens,user_history"
    entities = postgres_server.psql("SELECT count(*) FROM entities WHERE project_id = 'trm'", db=db)
    assert int(entities) >= 2

    store = FeatureStore(repo_path=str(prod_repo))
    assert isinstance(store._get_provider().online_store, RedisOnlineStore)
    assert isinstance(store.registry, SqlRegistry)
    assert _redis_cmd(redis_server, "DBSIZE") == b":0\r\n"

    rows = pd.DataFrame({
        "item_id": [11, 12, 13],
        "gen_tokens": [[1, 9, 17], [2, 10, 18], [3, 11, 19]],
        "mem_tokens": [[5, 6], [7], [8, 9, 10]],
        "coarse_tokens": [[1, 4], [2, 3], [3, 0]],
        "lexical_tokens": [[24346660, 19638016], [], [35676741]],
        "tokenizer_version": ["tok-a1", "tok-a1", "tok-b2"],
        "created_at": [1_700_000_000, 1_700_000_100, 1_700_000_200],
        "retired": [False, True, False],
        "event_timestamp": [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)],
        "created": [T0] * 3,
    })
    store.write_to_online_store("item_tokens", rows)
    assert int(_redis_cmd(redis_server, "DBSIZE")[1:-2]) >= 3, "rows must land in Redis"

    feats = [f"item_tokens:{f}" for f in ("gen_tokens", "mem_tokens", "tokenizer_version", "created_at", "retired")]
    got = FeatureStore(repo_path=str(prod_repo)).get_online_features(  # a fresh reader, as another pod
        features=feats, entity_rows=[{"item_id": i} for i in (11, 12, 13, 99)]).to_dict()
    assert got["gen_tokens"] == [[1, 9, 17], [2, 10, 18], [3, 11, 19], None]
    assert got["mem_tokens"] == [[5, 6], [7], [8, 9, 10], None]
    assert got["tokenizer_version"] == ["tok-a1", "tok-a1", "tok-b2", None]
    assert got["created_at"] == [1_700_000_000, 1_700_000_100, 1_700_000_200, None]
    assert got["retired"] == [False, True, False, None]

    # last write wins, as in the embedded store: the stream's next batch may carry a row stamped
    # with the same second (a user's second event in that second) and must replace the first
    later = rows.iloc[[0]].assign(gen_tokens=[[4, 12, 20]])
    store.write_to_online_store("item_tokens", later)
    again = store.get_online_features(features=["item_tokens:gen_tokens"], entity_rows=[{"item_id": 11}]).to_dict()
    assert again["gen_tokens"] == [[4, 12, 20]]


@pytest.mark.integration
def test_stream_feast_sink_writes_redis_online_and_offline_parts(prod_repo):
    """The workers' writer (streams.feast_sink.FeastSink) against the production stores."""
    from streams.feast_sink import FeastSink, offline_dir

    sink = FeastSink(prod_repo, writer_id="deploy-test")
    user7 = {"hist_gen_tokens": [1, 9, 17, 2, 10, 18], "hist_item_ids": [11, 12], "user_n_events": 3,
             "user_n_positives": 2, "recent_item_ids": [13, 11, 12], "recent_gen_tokens": [3, 11, 19, 1, 9, 17, 2, 10, 18],
             "recent_labels": [0, 1, 1], "last_event_time": 1_700_000_010}
    rows = [
        {"user_id": 7, **user7, "event_timestamp": 1_700_000_010},
        {"user_id": 8, "hist_gen_tokens": [], "hist_item_ids": [], "user_n_events": 1,
         "user_n_positives": 0, "recent_item_ids": [14], "recent_gen_tokens": [4, 12, 20], "recent_labels": [0],
         "last_event_time": 1_700_000_020, "event_timestamp": 1_700_000_020},
    ]
    sink.write("user_history", rows)
    got = FeastSink(prod_repo).read_online("user_history", [7, 8, 9])
    assert got[7] == {**user7, "tokenizer_version": None}  # not given: null
    assert got[8]["user_n_events"] == 1 and got[8]["user_n_positives"] == 0 and got[8]["recent_labels"] == [0]
    assert got[9]["user_n_events"] is None
    # the next batch's row for the same user and the same event second replaces the first
    sink.write("user_history", [{**rows[0], "user_n_events": 4, "user_n_positives": 3}])
    assert FeastSink(prod_repo).read_online("user_history", [7])[7]["user_n_events"] == 4
    parts = [p for p in offline_dir(prod_repo, "user_history").glob("*.parquet") if "deploy-test" in p.name]
    assert len(parts) == 2, "one offline part file per batch (two batches)"


def _healthcheck(*checks: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *checks], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


@pytest.mark.integration
def test_container_healthcheck_against_the_native_stores(feast_prod_env, tmp_path):
    before = _healthcheck("redis", "registry", env={})
    assert before.returncode == 1 and "redis: ok" in before.stdout
    assert "registry: FAILED" in before.stderr, "an un-applied registry is not healthy"
    repo = bootstrap.assemble_feature_repo(tmp_path / "repo")
    bootstrap.feast_apply(repo)
    after = _healthcheck("redis", "registry", env={})
    assert after.returncode == 0, after.stderr
    assert "registry: ok (3 feature views)" in after.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = _healthcheck("redis", env={"REDIS_PORT": str(closed)})
    assert down.returncode == 1 and "redis: FAILED" in down.stderr
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"x")
    assert _healthcheck(f"fresh={tmp_path / 'ckpt'}:600", env={}).returncode == 0
    os.utime(tmp_path / "ckpt" / "model.safetensors", (0, 0))
    stale = _healthcheck(f"fresh={tmp_path / 'ckpt'}:600", env={})
    assert stale.returncode == 1 and "old" in stale.stderr


@pytest.mark.integration
def test_bootstrap_creates_planned_topics_idempotently(monkeypatch):
    """deploy/bootstrap.py's topic step against a real Kafka-protocol broker (embedded Tansu)."""
    from streams.broker import EmbeddedBroker
    from streams.kafka_config import KafkaConfig

    with EmbeddedBroker() as broker:
        monkeypatch.setenv("TRM_TOPIC_PARTITIONS", "interactions=5,items=3")
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix="boot.")
        kafka_env = {"TRM_KAFKA_BOOTSTRAP": broker.bootstrap, "TRM_TOPIC_PREFIX": "boot."}
        before = _healthcheck("kafka", env=kafka_env)  # the workers' probe: not healthy before init
        assert before.returncode == 1 and "boot.interactions missing" in before.stderr
        first = bootstrap.create_topics(cfg, replication=1, wait_s=30)
        assert first["boot.interactions"] == 5 and first["boot.items"] == 3
        assert first["boot.item_tokens"] == bootstrap.DEFAULT_PARTITIONS["item_tokens"]
        assert first["boot.items.dlq"] == 1
        second = bootstrap.create_topics(cfg, replication=1, wait_s=30)  # re-run: no error, no change
        assert second == first
        after = _healthcheck("kafka", env=kafka_env)
        assert after.returncode == 0 and "kafka: ok" in after.stdout, after.stderr
