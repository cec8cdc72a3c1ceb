"""Prometheus metrics of the continuous trainer (`trm train --metrics-port`), served by prometheus_client.

  trm_trainer_events_total           events handed to the trainer (state.events_seen, resumed runs included)
  trm_trainer_steps_total            trained micro-batches (state.step)
  trm_trainer_checkpoint_age_seconds since this run's last durable checkpoint (absent before the first)
  trm_trainer_prequential_auc{model} AUC of the last micro-batch's scores, taken before it was trained on
  trm_trainer_prequential_logloss{model}
  trm_trainer_consumer_lag{partition} interactions log end (high watermark) - the offset the trainer
                                     has processed up to, while it follows Kafka
  trm_trainer_batch_seconds          histogram: one micro-batch, join to checkpoint

The gauges are read from the trainer when Prometheus scrapes; the histogram and the last AUCs are
fed by ContinuousTrainer.on_batch.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streams.metrics import LATENCY_BUCKETS, in_process_values, serve  # noqa: F401 - serve is re-exported


class TrainerMetrics:
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.last: dict[str, dict] = {}  # model -> last batch metrics
        self.registry = CollectorRegistry()
        with in_process_values():
            self.batch_seconds = Histogram("trm_trainer_batch_seconds", "one micro-batch, join to checkpoint",
                                           registry=self.registry, buckets=LATENCY_BUCKETS)
        self.registry.register(self)
        trainer.on_batch = self.observe

    def observe(self, seconds: float, metrics: dict) -> None:
        self.batch_seconds.observe(seconds)
        self.last.update(metrics)

    def collect(self):
        tr = self.trainer
        yield CounterMetricFamily("trm_trainer_events", "events handed to the trainer", value=tr.state.events_seen)
        yield CounterMetricFamily("trm_trainer_steps", "trained micro-batches", value=tr.state.step)
        if tr.checkpointed_at is not None:
            yield GaugeMetricFamily("trm_trainer_checkpoint_age_seconds", "seconds since the last checkpoint",
                                    value=time.time() - tr.checkpointed_at)
        auc = GaugeMetricFamily("trm_trainer_prequential_auc", "last micro-batch AUC, scored before training",
                                labels=["model"])
        ll = GaugeMetricFamily("trm_trainer_prequential_logloss", "last micro-batch log-loss", labels=["model"])
        for name, m in sorted(self.last.items()):
            if m.get("auc") == m.get("auc"):  # NaN (one class only) is left out
                auc.add_metric([name], m["auc"])
            ll.add_metric([name], m["logloss"])
        yield auc
        yield ll
        lag = GaugeMetricFamily("trm_trainer_consumer_lag", "log end - processed offset", labels=["partition"])
        consumer = tr.consumer
        if consumer is not None:
            for tp in consumer.assignment():
                hw = consumer.highwater(tp)
                if hw is not None:
                    done = tr.state.offsets.get(f"{tp.topic}:{tp.partition}", 0)
                    lag.add_metric([str(tp.partition)], max(0, hw - done))
        yield lag
