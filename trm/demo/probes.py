"""The demo's live measurements against the running pipeline: publish -> online freshness, raw consumer rate."""
from __future__ import annotations

import time
from pathlib import Path

from trm.demo import DemoError


def measure_freshness(kafka, repo: Path, next_id: int, n: int, rate_per_s: float) -> list[float]:
    """Publish `n` new items at `rate_per_s`; ms from send to visible in the online store, each."""
    from streams.contract.codec import AvroCodec
    from streams.contract.events import ItemEvent
    from streams.feast_sink import FeastSink
    from streams.publisher import make_producer

    sink, codec, producer = FeastSink(repo), AvroCodec(), make_producer(kafka, linger_ms=0)
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}
    now = int(time.time())
    try:
        for k in range(n):
            iid = next_id + k
            ev = ItemEvent(iid, f"Freshness probe {k}", f"Freshness probe {k}. Genres: Documentary",
                           ["Documentary"], now, now)
            producer.send(kafka.topic("items"), key=str(iid).encode(), value=codec.encode(ev.to_record(), "ItemEvent"))
            producer.flush()
            sent[iid] = time.perf_counter()
            _poll_online(sink, sent, seen)
            time.sleep(1.0 / rate_per_s)
        deadline = time.monotonic() + 30
        while len(seen) < len(sent) and time.monotonic() < deadline:
            _poll_online(sink, sent, seen)
            time.sleep(0.01)
    finally:
        producer.close(timeout=5)
    if len(seen) < len(sent):
        raise DemoError(f"{len(sent) - len(seen)} freshness probes never reached the online store in 30 s")
    return [(seen[i] - sent[i]) * 1000 for i in sent]


def _poll_online(sink, sent: dict[int, float], seen: dict[int, float]) -> None:
    pending = [i for i in sent if i not in seen]
    if not pending:
        return
    rows = sink.read_online("item_tokens", pending, ["tokenizer_version"])
    t = time.perf_counter()
    for i, r in rows.items():
        if r.get("tokenizer_version"):
            seen[i] = t


def raw_consume_rate(kafka, topic: str, n: int) -> float:
    """Messages/s of a bare aiokafka consumer reading `n` messages of `topic` from the start."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    async def run() -> float:
        c = AIOKafkaConsumer(kafka.topic(topic), auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, **kafka.aiokafka_kwargs())
        await c.start()
        try:
            got, t0 = 0, None
            while got < n:
                data = await c.getmany(timeout_ms=1000, max_records=10000)
                if not data:
                    break
                t0 = t0 or time.perf_counter()
                got += sum(len(v) for v in data.values())
            return got / (time.perf_counter() - t0) if t0 else 0.0
        finally:
            await c.stop()

    return asyncio.run(run())


def measure_rankable(kafka, repo: Path, models_dir: Path, next_id: int, n: int, user_id: int,
                     timeout_s: float = 30.0) -> list[float]:
    """Publish -> rankable: `trm serve` (the real app, uvicorn on a free loopback port) over the demo's
    online store and published models; for each of `n` new items, ms from its publish to the first
    POST /rank that answers it with `"known": true` (polled every 5 ms). One probe at a time."""
    import http.client
    import json
    import threading

    import uvicorn

    from streams.broker import free_port
    from streams.contract.codec import AvroCodec
    from streams.contract.events import ItemEvent
    from streams.publisher import make_producer
    from trainer.serving.app import create_app

    port = free_port()
    app = create_app(repo, models_dir, poll_s=0.5)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="trm-demo-serve", daemon=True)
    thread.start()
    conn = None

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        nonlocal conn
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = None
            return 0, {}

    codec, producer = AvroCodec(), make_producer(kafka, linger_ms=0)
    out: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while call("GET", "/healthz")[0] != 200:
            if time.monotonic() > deadline:
                raise DemoError("trm serve did not become ready in 60 s (no published model?)")
            time.sleep(0.1)
        now = int(time.time())
        for k in range(n):
            iid = next_id + k
            ev = ItemEvent(iid, f"Rankable probe {k}", f"Rankable probe {k}. Genres: Comedy", ["Comedy"], now, now)
            producer.send(kafka.topic("items"), key=str(iid).encode(), value=codec.encode(ev.to_record(), "ItemEvent"))
            producer.flush()
            t0 = time.perf_counter()
            while True:
                st, body = call("POST", "/rank", {"user_id": user_id, "item_ids": [iid]})
                if st == 200 and body["items"][0]["known"]:
                    out.append((time.perf_counter() - t0) * 1000)
                    break
                if time.perf_counter() - t0 > timeout_s:
                    raise DemoError(f"item {iid} was not rankable with its tokens {timeout_s:.0f} s after publishing")
                time.sleep(0.005)
    finally:
        producer.close(timeout=5)
        if conn is not None:
            conn.close()
        server.should_exit = True
        thread.join(10)
    return out
