"""Online ranking (`trm serve`): the trainer's own scoring, served over HTTP on live Feast features.

  registry.py  the published-version watcher: verify, load off the request path, swap atomically
  online.py    one request's online feature read (FeatureService `ranker_features`) -> a joined frame
  app.py       the FastAPI app: POST /rank, GET /healthz, GET /metrics (Prometheus)

Why here, in `trainer/`: serving must score exactly as the trainer and `trm eval` score (the same
Featurizer, the same `personal_logit`, trainer.evaluate.score), so it lives beside them and
imports them instead of re-implementing any of it. fastapi/uvicorn/prometheus_client are imported
by app.py only; importing this package needs none of them.
"""
