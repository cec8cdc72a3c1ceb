"""`trm serve`: rank candidates over HTTP with the newest published model on online Feast features.

FastAPI, uvicorn and torch load only when the command runs (`trm --help` stays instant).
The app is trainer/serving/app.py; new versions the trainer publishes are picked up while it runs.
`--token-cache kafka` reads the candidates' item tokens from an in-process cache of the item_tokens
topic (trainer/serving/token_cache.py) instead of the Feast online store.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODELS = Path("runs") / "trainer" / "models"  # `trm train`'s default --models-dir


def _serve(args) -> int:
    import logging

    import uvicorn

    from trainer.serving.app import create_app
    from trm.config import feast_repo_path

    if args.max_candidates < 1:
        raise SystemExit("trm serve: --max-candidates must be at least 1")
    if args.poll_s <= 0:
        raise SystemExit("trm serve: --poll-s must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache = None
    if args.token_cache == "kafka":
        from streams.kafka_config import KafkaConfig
        from trainer.serving.token_cache import KafkaTokenCache

        cache = KafkaTokenCache(KafkaConfig.from_env(bootstrap_servers=args.bootstrap), args.token_topic)
    app = create_app(feast_repo_path(args.repo), args.models, model=args.model, max_candidates=args.max_candidates,
                     poll_s=args.poll_s, token_cache=cache)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("serve", help="HTTP ranking service: POST /rank, GET /healthz, GET /metrics")
    s.add_argument("--repo", default=None, help="Feast repo (default: TRM_FEAST_REPO or feature_repo/)")
    s.add_argument("--models", default=str(DEFAULT_MODELS),
                   help="published model versions (v<step>/ and LATEST, `trm train --models-dir`)")
    s.add_argument("--model", default="trm", help="which model of a version to serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-candidates", type=int, default=1000, help="most item_ids one /rank request may carry")
    s.add_argument("--poll-s", type=float, default=2.0, help="seconds between reads of the LATEST pointer")
    s.add_argument("--token-cache", choices=("off", "kafka"), default="off",
                   help="where the candidates' item tokens come from: off = the Feast online store (default); "
                        "kafka = an in-process cache fed by the item_tokens topic (misses and the user's "
                        "features still from Feast)")
    s.add_argument("--bootstrap", default=None,
                   help="--token-cache kafka: Kafka bootstrap (default TRM_KAFKA_BOOTSTRAP; security settings "
                        "from TRM_KAFKA_*)")
    s.add_argument("--token-topic", default="item_tokens",
                   help="--token-cache kafka: the item tokens topic (contract name, prefixed by TRM_TOPIC_PREFIX)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=_serve)
