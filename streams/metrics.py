"""Prometheus metrics of a stream worker (`trm worker --metrics-port`), served by prometheus_client.

What is exported, per agent (items, interactions, item_stats):

  trm_worker_events_total{agent, outcome}      processed | dead_lettered | skipped | duplicate | folded
  trm_worker_dead_letters_total{agent, reason}  dead letters by reason kind (streams/dlq.py)
  trm_worker_batches_total{agent}               batches applied
  trm_worker_parked{agent}                      interactions waiting for their item's tokens
  trm_worker_consumer_lag{agent, partition}     log end (high watermark) - committed offset
  trm_worker_batch_seconds{agent}               histogram: one batch, from its records to its offset commit
  trm_worker_freshness_seconds{agent}           histogram: an event's Kafka timestamp (publish) -> its
                                                batch's Feast write committed (online and offline)
  trm_worker_retries_total{agent}, trm_worker_uptime_seconds

Counters and the lag are read from the loops when Prometheus scrapes (a Collector, nothing is
double-booked); the two histograms are observed by the loop after each batch (BatchLoop.on_timed).

Why `in_process_values`: importing feast.metrics (Feast does it lazily, e.g. on an online read) sets
PROMETHEUS_MULTIPROC_DIR for Feast's gunicorn feature server, and every prometheus_client metric
created after that keeps its value in a per-process file keyed by the metric's *name*: two
registries in one process (the tests; the demo's worker and trainer) would share every value.
prometheus_client chooses the value class when a metric or a label child is created, so metrics
are created inside this context, with their label children, up front.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .app import StreamWorker

_VALUES_LOCK = threading.Lock()
# outcome label -> the field of streams.batch_loop.Counters that counts it
OUTCOMES = {"processed": "processed", "dead_lettered": "dead_lettered", "skipped": "skipped",
            "duplicate": "duplicates", "folded": "folded"}
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


@contextmanager
def in_process_values():
    """Create prometheus_client metrics whose values live in the metric object (see the module docstring)."""
    with _VALUES_LOCK:
        saved = prometheus_values.ValueClass
        prometheus_values.ValueClass = prometheus_values.MutexValue
        try:
            yield
        finally:
            prometheus_values.ValueClass = saved


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """GET /metrics on host:port in a daemon thread (prometheus_client's own HTTP server); returns it."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


class WorkerMetrics:
    """The worker's registry: histograms observed per batch, counters and lag collected at scrape time."""

    def __init__(self, worker: "StreamWorker") -> None:
        self.worker = worker
        self.registry = CollectorRegistry()
        with in_process_values():
            self.batch_seconds = Histogram("trm_worker_batch_seconds", "one batch, records to offset commit",
                                           ["agent"], registry=self.registry, buckets=LATENCY_BUCKETS)
            self.freshness = Histogram("trm_worker_freshness_seconds", "event publish (Kafka timestamp) -> "
                                       "written to Feast and committed", ["agent"], registry=self.registry,
                                       buckets=LATENCY_BUCKETS)
            self._children = {name: (self.batch_seconds.labels(name), self.freshness.labels(name))
                              for name in ("items", "interactions", "item_stats")}
        self.registry.register(self)

    def timed(self, agent: str):
        """The callback a BatchLoop calls after each batch: (seconds, the records' Kafka timestamps in ms)."""
        batch, fresh = self._children[agent]

        def observe(seconds: float, timestamps_ms: list[int]) -> None:
            batch.observe(seconds)
            now_ms = time.time() * 1000.0
            for ts in timestamps_ms:
                if ts is not None and ts > 0:
                    fresh.observe(max(0.0, now_ms - ts) / 1000.0)
        return observe

    def collect(self):
        """Called by prometheus_client on every scrape."""
        loops = self.worker.loops
        events = CounterMetricFamily("trm_worker_events", "events by outcome", labels=["agent", "outcome"])
        dead = CounterMetricFamily("trm_worker_dead_letters", "dead letters by reason", labels=["agent", "reason"])
        batches = CounterMetricFamily("trm_worker_batches", "batches applied", labels=["agent"])
        retries = CounterMetricFamily("trm_worker_retries", "failed batch attempts retried", labels=["agent"])
        parked = GaugeMetricFamily("trm_worker_parked", "interactions waiting for item tokens", labels=["agent"])
        lag = GaugeMetricFamily("trm_worker_consumer_lag", "high watermark - committed offset",
                                labels=["agent", "partition"])
        for name, lp in loops.items():
            c = lp.counters
            for outcome, counter in OUTCOMES.items():
                events.add_metric([name, outcome], getattr(c, counter))
            for reason, n in sorted(c.dlq_reasons.items()):
                dead.add_metric([name, reason], n)
            batches.add_metric([name], c.batches)
            retries.add_metric([name], lp.retries)
            parked.add_metric([name], c.parked)
            for part, n in sorted(lp.lag().items()):
                lag.add_metric([name, str(part)], n)
        yield from (events, dead, batches, retries, parked, lag)
        yield GaugeMetricFamily("trm_worker_uptime_seconds", "seconds since the worker started",
                                value=time.time() - self.worker.started_at)
