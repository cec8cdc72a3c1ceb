"""`trm broker`, `trm topics`, `trm publish`, `trm worker`, `trm feast-repo`: the streaming commands.

Heavy libraries (kafka, faust, feast) are imported inside the handlers so `trm --help` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_DATA = "data/ml-latest-small"


def _broker(args) -> int:
    from streams.broker import main_broker

    return main_broker(args.port, prefix_topics=not args.no_topics, storage=args.storage)


def _topics(args) -> int:
    from streams.contract.topics import create_topics
    from streams.errors import StreamsError
    from streams.kafka_config import KafkaConfig

    try:
        made = create_topics(KafkaConfig.from_env())
    except StreamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for t, n in made.items():
        print(f"{t}\t{n} partitions")
    return 0


def _publish(args) -> int:
    from kafka.errors import KafkaError

    from streams.contract.topics import create_topics
    from streams.errors import StreamsError
    from streams.kafka_config import KafkaConfig
    from streams.publisher import events_from_file, interaction_events, item_events, publish_kind

    config = KafkaConfig.from_env()
    try:
        if args.file:
            events = events_from_file(args.file, args.kind)[: args.limit or None]
        elif args.kind == "items":
            events = item_events(args.data, args.limit)
        else:
            events = interaction_events(args.data, args.limit)
        create_topics(config)  # explicit partition counts; never let a metadata request auto-create
        res = publish_kind(config, args.kind, events, speedup=args.speedup, progress=not args.quiet)
    except (StreamsError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"published {res.sent} {args.kind} events to {res.topic} in {res.seconds:.2f} s "
          f"({res.rate:,.0f}/s), all acknowledged")
    return 0


def _worker(args) -> int:
    from streams.app import WorkerSettings, run_worker
    from trm.config import feast_repo_path, tokenizer_artifact_path

    repo = args.repo or os.environ.get("TRM_FEAST_REPO")
    if not repo:
        print("error: no Feast repo: pass --repo DIR or set TRM_FEAST_REPO (`trm feast-repo --out DIR` makes one)")
        return 2
    settings = WorkerSettings(repo_path=feast_repo_path(repo), tokenizer_dir=tokenizer_artifact_path(args.tokenizer),
                              state_dir=args.state, pairs_dir=args.pairs, agents=tuple(args.agents.split(",")),
                              history_len=args.history_len, recent_len=args.recent_len,
                              park_timeout_s=args.park_timeout,
                              allowed_lateness_s=args.allowed_lateness, retry_budget_s=args.retry_budget,
                              metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    return run_worker(settings)


def _feast_repo(args) -> int:
    from streams.feature_repo_tools import materialize_repo

    repo = materialize_repo(args.out)
    print(f"feature repo applied at {repo}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("broker", help="start the embedded Tansu broker and print its address")
    p.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    p.add_argument("--storage", default="memory://tansu/",
                   help="memory://tansu/ (default: a restart loses everything) or s3://BUCKET/ (durable; "
                        "endpoint and credentials from AWS_ENDPOINT, AWS_ACCESS_KEY_ID, ...)")
    p.add_argument("--no-topics", action="store_true", help="do not create the contract's topics")
    p.set_defaults(func=_broker)

    p = subparsers.add_parser("topics", help="create the contract's topics with explicit partition counts")
    p.set_defaults(func=_topics)

    p = subparsers.add_parser("publish", help="publish MovieLens items or interactions to Kafka in event-time order")
    p.add_argument("kind", choices=["items", "interactions"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=DEFAULT_DATA, help="MovieLens-layout directory (default: %(default)s)")
    src.add_argument("--file", help="JSON lines of event records instead of MovieLens")
    p.add_argument("--speedup", type=float, default=None,
                   help="replay event time at this many times real time (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="publish only the first N events")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_publish)

    p = subparsers.add_parser("worker", help="run the Faust stream worker (item, interaction and item-stats agents)")
    p.add_argument("--repo", default=None,
                   help="applied Feast repo directory (see `trm feast-repo`; default: $TRM_FEAST_REPO)")
    p.add_argument("--tokenizer", default=None,
                   help="saved tokenizer artifact directory (item agent; default: $TRM_TOKENIZER_ARTIFACT)")
    p.add_argument("--state", default=None, help="state directory (default: <repo>/stream_state)")
    p.add_argument("--pairs", default=None, help="co-interaction pair parquet dir (default: <repo>/data/pairs)")
    p.add_argument("--agents", default="items,interactions,item_stats",
                   help="comma list of items,interactions,item_stats (item_stats counts per item what the "
                        "interaction agents forward to interactions_by_item; default: all three)")
    p.add_argument("--history-len", type=int, default=20, help="N: positives kept per user history")
    p.add_argument("--recent-len", type=int, default=20,
                   help="R: a user's last applied events, positives and negatives, in its recent_* features")
    p.add_argument("--park-timeout", type=float, default=900.0,
                   help="seconds an interaction waits for its item's tokens before it is dead-lettered")
    p.add_argument("--allowed-lateness", type=float, default=7 * 86400.0,
                   help="event-time seconds an interaction may lag its partition's newest one and still be "
                        "placed exactly; older ones are dead-lettered as late (default: 7 days). The state "
                        "keeps every event inside it: memory ~ 400 B x events/s x this (measured, make soak)")
    p.add_argument("--retry-budget", type=float, default=240.0,
                   help="seconds a failing batch (Feast or Kafka down) is retried in place, with backoff, before "
                        "the worker exits non-zero for its supervisor to restart it (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (consumer lag, events and dead letters by reason, "
                        "batch latency, publish -> online freshness; streams/metrics.py). Default: off")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (0.0.0.0 in a container)")
    p.set_defaults(func=_worker)

    p = subparsers.add_parser("feast-repo", help="copy feature_repo/ to a work directory and apply it")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_feast_repo)
