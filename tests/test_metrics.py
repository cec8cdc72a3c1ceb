"""Pipeline observability: the worker's and the trainer's Prometheus /metrics, scraped over HTTP.

Real Tansu broker, real Feast repo, real (tiny) tokenizer; the numbers scraped must equal what the
worker's own counters say (and what was published): events by outcome, dead letters by reason,
consumer lag 0 once caught up, batch latency and publish -> online freshness observed per batch.
"""
from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.services import free_port
from tests.stream_checks import run_worker
from tests.streams_fixtures import broker, feast_repo, kafka_config, ml_slice, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of GET http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_worker_metrics_count_what_the_worker_did(kafka_config, feast_repo, tiny_tokenizer, ml_slice):  # noqa: F811
    from streams.app import WorkerSettings
    from streams.contract.events import InteractionEvent, ItemEvent
    from streams.publisher import publish_kind, publish_raw

    cfg = kafka_config
    items, its = ml_slice
    its = its[:500]
    item_events = [ItemEvent.from_item(i) for i in items.values()]
    inter = [InteractionEvent.from_interaction(i) for i in its]
    bad = [(b"1", b"not avro at all"), (b"2", b"\x00\x00\x00\x00\x01\xff")]
    port = free_port()
    settings = WorkerSettings(repo_path=feast_repo, tokenizer_dir=tiny_tokenizer, kafka=cfg, app_id="t-metrics",
                              metrics_port=port)
    got: dict = {}

    async def publish(w):
        await asyncio.to_thread(publish_kind, cfg, "items", item_events, progress=False)
        await asyncio.to_thread(publish_kind, cfg, "interactions", inter, progress=False)
        await asyncio.to_thread(publish_raw, cfg, "interactions", bad)
        await w.wait_for(items=len(item_events), interactions=len(inter) + len(bad), timeout=90)
        for _ in range(50):  # the lag is read from the last fetch's high watermark: one more poll
            got.update(await asyncio.to_thread(scrape, port))
            if all(v == 0 for (n, _), v in got.items() if n == "trm_worker_consumer_lag"):
                break
            await asyncio.sleep(0.2)
        got["status"] = w.status()

    asyncio.run(run_worker(settings, publish))
    st = got.pop("status")
    ev = lambda agent, outcome: got[("trm_worker_events_total", (("agent", agent), ("outcome", outcome)))]  # noqa: E731
    assert ev("items", "processed") == st["items"]["processed"] == len(item_events)
    assert ev("interactions", "processed") == st["interactions"]["processed"] == len(inter)
    assert ev("interactions", "dead_lettered") == 2
    reasons = {dict(lb)["reason"]: v for (n, lb), v in got.items() if n == "trm_worker_dead_letters_total"}
    assert sum(reasons.values()) == 2 and reasons == st["interactions"]["dlq_reasons"], reasons
    lags = {lb: v for (n, lb), v in got.items() if n == "trm_worker_consumer_lag"}
    assert lags and all(v == 0 for v in lags.values()), lags  # caught up: committed at the log end
    assert {dict(lb)["agent"] for lb in lags} == {"items", "interactions", "item_stats"}
    n_batches = got[("trm_worker_batch_seconds_count", (("agent", "interactions"),))]
    assert n_batches == st["interactions"]["batches"] >= 1
    # every consumed record observed once: publish -> written to Feast and committed, in (0, 90) s
    n_fresh = got[("trm_worker_freshness_seconds_count", (("agent", "interactions"),))]
    assert n_fresh == len(inter) + len(bad)
    mean = got[("trm_worker_freshness_seconds_sum", (("agent", "interactions"),))] / n_fresh
    assert 0 < mean < 90
    assert got[("trm_worker_uptime_seconds", ())] > 0
    with pytest.raises(OSError):  # the server stops with the worker
        scrape(port)


def test_trainer_metrics_follow_the_trainer_over_kafka(kafka_config, tmp_path):  # noqa: F811
    """`trm train --follow`'s metrics: lag > 0 while events wait, 0 once followed; per-model AUC equal
    to the last batch's prequential line; steps and events; checkpoint age from the last checkpoint."""
    import json
    import time

    from tests.trainer_fixtures import event_stream, featurizer, make_repo, publish, small_config
    from trainer.kafka_source import follow
    from trainer.learner import Learner, LearnerConfig
    from trainer.pit_join import FeastJoiner
    from trainer.prequential import ContinuousTrainer
    from trainer.telemetry import TrainerMetrics, serve

    stream = event_stream(400)
    cfg = small_config()
    tr = ContinuousTrainer(Learner(["trm", "id"], cfg, LearnerConfig(minibatch=50)),
                           FeastJoiner(str(make_repo(tmp_path, stream))), featurizer(cfg), tmp_path / "ckpt",
                           log_path=tmp_path / "prequential.jsonl")
    port = free_port()
    server = serve(TrainerMetrics(tr).registry, port)
    try:
        before = scrape(port)
        assert before[("trm_trainer_steps_total", ())] == 0
        assert not any(n == "trm_trainer_checkpoint_age_seconds" for n, _ in before)  # no checkpoint yet
        publish(kafka_config, stream)
        seen_lag: list[float] = []

        async def scenario():
            task = asyncio.create_task(follow(tr, kafka_config, group_id="trm-trainer-metrics", batch_size=100,
                                              idle_timeout_s=3.0, linger_s=0.5))
            while not task.done():
                got = await asyncio.to_thread(scrape, port)
                seen_lag.extend(v for (n, _), v in got.items() if n == "trm_trainer_consumer_lag")
                await asyncio.sleep(0.1)
            return await task

        assert asyncio.run(scenario()) == len(stream)
        got = scrape(port)
    finally:
        server.shutdown()
    assert max(seen_lag) > 0  # events were waiting at some scrape
    assert got[("trm_trainer_events_total", ())] == len(stream) == tr.state.events_seen
    assert got[("trm_trainer_steps_total", ())] == tr.state.step == 4
    assert got[("trm_trainer_batch_seconds_count", ())] == 4
    last = {}
    for line in (tmp_path / "prequential.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["model"]] = rec
    for model in ("trm", "id"):
        assert got[("trm_trainer_prequential_auc", (("model", model),))] == pytest.approx(last[model]["auc"])
    age = got[("trm_trainer_checkpoint_age_seconds", ())]
    assert 0 <= age <= time.time() - tr.checkpointed_at + 1
    assert not any(n == "trm_trainer_consumer_lag" for n, _ in got)  # stopped following: no consumer
