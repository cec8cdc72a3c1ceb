"""Container health: can this process reach what it needs? Exit 0 if every named check passes.

    python deploy/healthcheck.py kafka redis            # worker: broker + online store
    python deploy/healthcheck.py kafka registry fresh=/var/lib/trm/checkpoints:900   # trainer
    python deploy/healthcheck.py http=http://127.0.0.1:8000/healthz                  # server

The worker/trainer process itself is PID 1 (its death restarts the container); these checks
catch the other failure: alive but cut off (expired SASL credentials, a moved Redis, a stalled
trainer). Uses only the image's Python and the project's own settings, so a check passes only
when the settings the process runs with would work.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def check_kafka(timeout_s: float = 10.0) -> str:
    """Bootstrap + metadata with the full TRM_KAFKA_* security settings (SASL/TLS included)."""
    from kafka import KafkaConsumer

    from streams.kafka_config import KafkaConfig

    cfg = KafkaConfig.from_env()
    consumer = KafkaConsumer(client_id="trm-healthcheck", request_timeout_ms=int(timeout_s * 1000),
                             **cfg.kafka_python_kwargs())
    try:
        topics = consumer.topics()
    finally:
        consumer.close()
    want = cfg.topic("interactions")
    if want not in topics:
        raise RuntimeError(f"topic {want} missing (has the init job run?)")
    return f"{len(topics)} topics"


def check_redis(timeout_s: float = 5.0) -> str:
    """PING the online store named by REDIS_HOST/REDIS_PORT (the feature_store.yaml variables)."""
    import redis

    opts = dict(kv.split("=", 1) for kv in os.environ.get("REDIS_OPTIONS", "").split(",") if "=" in kv)
    client = redis.Redis(host=os.environ["REDIS_HOST"], port=int(os.environ["REDIS_PORT"]),
                         password=opts.get("password") or None, ssl=opts.get("ssl", "").lower() == "true",
                         socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if not client.ping():
        raise RuntimeError("PING failed")
    return "PONG"


def check_registry(timeout_s: float = 5.0) -> str:
    """Open the Feast SQL registry database (FEAST_REGISTRY_*) and see `feast apply` has run."""
    import psycopg

    with psycopg.connect(host=os.environ["FEAST_REGISTRY_HOST"], port=os.environ["FEAST_REGISTRY_PORT"],
                         user=os.environ["FEAST_REGISTRY_USER"],
                         password=os.environ.get("FEAST_REGISTRY_PASSWORD") or None,
                         dbname=os.environ["FEAST_REGISTRY_DB"], connect_timeout=int(timeout_s)) as conn:
        n = conn.execute("SELECT count(*) FROM feature_views").fetchone()[0]
    if n == 0:
        raise RuntimeError("no feature views registered (has the init job run `feast apply`?)")
    return f"{n} feature views"


def check_fresh(spec: str) -> str:
    """fresh=PATH:SECONDS: the newest file under PATH changed within SECONDS (a trainer that
    stopped checkpointing is stuck even if its process lives). An empty PATH passes until
    SECONDS after container start, so a fresh trainer is not killed before its first checkpoint."""
    path, _, max_age = spec.rpartition(":")
    root, max_age_s = Path(path), float(max_age)
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    if not files:
        started = Path("/proc/1").stat().st_mtime if Path("/proc/1").exists() else time.time()
        if time.time() - started > max_age_s:
            raise RuntimeError(f"nothing written under {root} in {max_age_s:.0f}s")
        return "no checkpoint yet"
    age = time.time() - max(p.stat().st_mtime for p in files)
    if age > max_age_s:
        raise RuntimeError(f"newest file under {root} is {age:.0f}s old (> {max_age_s:.0f}s)")
    return f"newest file {age:.0f}s old"


def check_http(url: str, timeout_s: float = 5.0) -> str:
    """http=URL: a GET of URL answers 2xx (the server's /healthz: a model version loaded and the
    online store answering). Any other status, or no answer, fails with the body's first bytes."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return f"{resp.status}"
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{exc.code}: {exc.read()[:300].decode(errors='replace')}") from None


CHECKS = {"kafka": check_kafka, "redis": check_redis, "registry": check_registry}
PREFIXED = ("fresh=", "http=")  # checks that take an argument: fresh=PATH:SECONDS, http=URL


def main(argv: list[str]) -> int:
    if not argv:
        print(f"usage: healthcheck.py {{{'|'.join(CHECKS)}|fresh=PATH:SECONDS|http=URL}} ...", file=sys.stderr)
        return 2
    failed = False
    for name in argv:
        try:
            if name.startswith("fresh="):
                detail = check_fresh(name[6:])
            elif name.startswith("http="):
                detail = check_http(name[5:])
            else:
                detail = CHECKS[name]()
            print(f"{name}: ok ({detail})")
        except KeyError as exc:
            failed = True
            print(f"{name}: FAILED: unknown check or unset variable {exc}", file=sys.stderr)
        except Exception as exc:
            failed = True
            print(f"{name}: FAILED: {exc!r}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
