"""The topics of the wire contract: names, keys, partition counts, topic configs, dead-letter and
consumer-group names, and the one `create_topics` that makes them (docs/contracts.md).

Everything that creates or names a topic or a group reads it here: the workers (`streams.app`),
the trainer's Kafka source, the embedded broker helper, `trm topics` and `deploy/bootstrap.py`.
So development topics get the production configs (a compacted `item_tokens`), and the trainer
finds the workers' groups without rebuilding their names.

Partition counts come in two profiles. `EMBEDDED` (one machine, `make demo`, the tests) keeps
group joins and log-end checks cheap. `PRODUCTION` (the init job): a partition count is the most
workers that can share a topic's load, and a keyed topic cannot grow later without moving keys
between partitions (per-user history would split), so those topics start with room to scale.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from streams.errors import StreamsError

ITEMS, INTERACTIONS, ITEM_TOKENS = "items", "interactions", "item_tokens"
INTERACTIONS_BY_ITEM = "interactions_by_item"  # internal: accepted interactions keyed by item_id
ITEM_STATS = "item_stats"  # the item-stats agent's name (it consumes INTERACTIONS_BY_ITEM)
DLQ_SUFFIX = ".dlq"
TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


def dlq_of(topic: str) -> str:
    """The dead-letter topic of `topic` (a full, prefixed name stays prefixed)."""
    return f"{topic}{DLQ_SUFFIX}"


@dataclass(frozen=True)
class TopicSpec:
    name: str  # contract name; clients add KafkaConfig.topic_prefix
    key: str | None  # what the record key holds: one entity's events stay ordered in one partition
    embedded_partitions: int
    production_partitions: int
    # item_tokens is compacted: every worker rebuilds its token cache by reading it from the
    # beginning, so it must keep the latest tokens of *every* item forever (time-based retention
    # would drop old items' tokens and their interactions would park, then dead-letter), and
    # nothing older. items is the catalogue's source of truth (re-tokenizing replays it): kept
    # forever, not compacted (a retire without text needs the upsert before it). interactions and
    # the DLQs keep the broker's retention; DLQ keys may be null, which compaction rejects.
    configs: dict[str, str] = field(default_factory=dict)


TOPICS: dict[str, TopicSpec] = {t.name: t for t in (
    TopicSpec(ITEMS, "item_id", 2, 6, {"retention.ms": "-1"}),
    TopicSpec(INTERACTIONS, "user_id", 4, 6),
    TopicSpec(ITEM_TOKENS, "item_id", 2, 6, {"cleanup.policy": "compact"}),
    TopicSpec(INTERACTIONS_BY_ITEM, "item_id", 4, 6),
    TopicSpec(dlq_of(ITEMS), None, 1, 1),
    TopicSpec(dlq_of(INTERACTIONS), None, 1, 1),
    TopicSpec(dlq_of(INTERACTIONS_BY_ITEM), None, 1, 1),
)}
EMBEDDED, PRODUCTION = "embedded", "production"


def topic_plan(profile: str = EMBEDDED, env: dict | None = None) -> dict[str, int]:
    """{contract name: partitions} of a profile; with `env`, TRM_TOPIC_PARTITIONS="interactions=12,items=6"
    overrides single counts (the init job passes its environment)."""
    if profile not in (EMBEDDED, PRODUCTION):
        raise ValueError(f"unknown topic profile {profile!r}: {EMBEDDED} | {PRODUCTION}")
    plan = {name: (t.embedded_partitions if profile == EMBEDDED else t.production_partitions)
            for name, t in TOPICS.items()}
    spec = (env or {}).get("TRM_TOPIC_PARTITIONS", "").strip()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, count = part.partition("=")
        if not sep or name not in plan or not count.isdigit() or int(count) < 1:
            raise TopicError(f"TRM_TOPIC_PARTITIONS: bad entry {part!r}; expected NAME=N with NAME in "
                             f"{sorted(plan)} and N >= 1")
        plan[name] = int(count)
    return plan


@dataclass(frozen=True)
class WorkerGroups:
    """The consumer groups of one stream-worker app (`trm worker`, `WorkerSettings.app_id`)."""

    app_id: str = "trm-worker"

    @property
    def items(self) -> str:
        return f"{self.app_id}-items"

    @property
    def interactions(self) -> str:
        return f"{self.app_id}-interactions"

    @property
    def item_stats(self) -> str:
        return f"{self.app_id}-item-stats"

    @classmethod
    def of_interactions_group(cls, group: str) -> "WorkerGroups | None":
        """The app whose interaction agent uses `group` (what `trm train --feature-group` names);
        None for a group that is not a worker's interactions group."""
        suffix = "-interactions"
        return cls(group[:-len(suffix)]) if group.endswith(suffix) and len(group) > len(suffix) else None


TRAINER_GROUP = "trm-trainer"  # default group of `trm train --follow`
DEFAULT_WORKER_GROUPS = WorkerGroups()



class TopicError(StreamsError, RuntimeError):
    """The broker is unreachable, refused a topic, or a partition override is malformed."""


def create_topics(config, plan: dict[str, int] | None = None, *, replication: int = 1,
                  wait_s: float = 15.0) -> dict[str, int]:
    """Create the contract's topics (names prefixed by `config.topic_prefix`) with `plan`'s partition
    counts (default: the embedded profile) and the contract's topic configs.

    Waits up to `wait_s` for the broker (a Kubernetes Job may start before Kafka). Existing topics
    are kept: one with fewer partitions than planned is reported in the result, not altered
    (adding partitions re-maps keys, which only an operator should decide; deploy/README.md).
    Returns {full topic name: partitions it has}. Works against Tansu too: its `list_topics()`
    fails, so "already exists" answers are how we learn a topic is there.
    """
    from kafka.admin import KafkaAdminClient

    plan = plan or topic_plan(EMBEDDED)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            admin = KafkaAdminClient(client_id="trm-admin", request_timeout_ms=10000, **config.kafka_python_kwargs())
            break
        except Exception as exc:  # NoBrokersAvailable, auth errors while a broker starts, ...
            if time.monotonic() > deadline:
                raise TopicError(f"cannot reach Kafka at {config.bootstrap_servers} after {wait_s:.0f} s: {exc!r}; "
                                 f"start one with `trm broker`, or check TRM_KAFKA_BOOTSTRAP and the "
                                 f"TRM_KAFKA_* security settings") from exc
            time.sleep(0.3)
    full = {config.topic(name): n for name, n in plan.items()}
    try:
        result = admin.create_topics(
            {config.topic(name): {"num_partitions": n, "replication_factor": replication,
                                  "configs": TOPICS[name].configs} for name, n in plan.items()},
            raise_errors=False)
        for topic in result["topics"]:
            code = topic["error_code"]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise TopicError(f"creating topic {topic['name']} failed: error {code} {topic.get('error_message')}")
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(full))}
    finally:
        admin.close()


def production_replication(env: dict | None = None) -> int:
    """Replication factor of the production topics: TRM_TOPIC_REPLICATION (default 1)."""
    return int((os.environ if env is None else env).get("TRM_TOPIC_REPLICATION", "1"))
