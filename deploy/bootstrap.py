"""One-shot cluster bootstrap: create the Kafka topics, assemble the production Feast repo, `feast apply`.

Run by the compose `init` service and the Kubernetes `trm-init` Job before any worker starts:

    python deploy/bootstrap.py                # topics + feast apply
    python deploy/bootstrap.py topics         # only the topics
    python deploy/bootstrap.py feast          # only assemble + apply
    python deploy/bootstrap.py assemble       # only build the repo dir (the Dockerfile does this)

Every setting comes from the environment (trm/config.py), so the same script bootstraps a local
compose stack and a SASL_SSL production cluster. Idempotent: re-running changes nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
ROOT = DEPLOY_DIR.parent
if str(ROOT) not in sys.path:  # run as a script from a source checkout or /app in the image
    sys.path.insert(0, str(ROOT))

# Partition count = the most workers that can share a topic's load (one partition is owned by
# one consumer of the group). Keyed topics cannot grow later without moving keys between
# partitions (per-user history would split), so create them with room to scale.
DEFAULT_PARTITIONS = {
    "items": 6,
    "interactions": 6,
    "item_tokens": 6,
    "interactions_by_item": 6,  # internal repartition (accepted interactions keyed by item_id)
    "items.dlq": 1,
    "interactions.dlq": 1,
    "interactions_by_item.dlq": 1,
}
TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code

# Per-topic settings. item_tokens is compacted: every worker rebuilds its token cache by reading
# it from the beginning, so it must keep the latest tokens of *every* item forever (time-based
# retention would drop old items' tokens and their interactions would park, then dead-letter),
# and nothing older. items is the catalogue's source of truth (re-tokenizing replays it): kept
# forever, not compacted (a retire without text needs the upsert before it). interactions and
# the DLQs keep the broker's retention; DLQ keys may be null, which compaction rejects.
TOPIC_CONFIGS = {
    "item_tokens": {"cleanup.policy": "compact"},
    "items": {"retention.ms": "-1"},
}


def topic_plan(env: dict | None = None) -> dict[str, int]:
    """Partition counts, overridable as TRM_TOPIC_PARTITIONS="interactions=12,items=6"."""
    env = os.environ if env is None else env
    plan = dict(DEFAULT_PARTITIONS)
    spec = env.get("TRM_TOPIC_PARTITIONS", "").strip()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, count = part.partition("=")
        if not sep or name not in plan or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"TRM_TOPIC_PARTITIONS: bad entry {part!r}; expected NAME=N with NAME in "
                             f"{sorted(plan)} and N >= 1")
        plan[name] = int(count)
    return plan


def create_topics(cfg=None, *, replication: int | None = None, wait_s: float = 120.0) -> dict[str, int]:
    """Create every project topic with its partition count; return {full topic name: partitions}.

    Waits for the broker (compose starts us once Kafka is healthy, but Kubernetes Jobs may start first).
    Existing topics are kept; one with fewer partitions than planned is reported, not altered:
    adding partitions re-maps keys, which only an operator should decide (deploy/README.md).
    """
    from kafka.admin import KafkaAdminClient

    from trm.config import KafkaConfig

    cfg = cfg or KafkaConfig.from_env()
    replication = replication or int(os.environ.get("TRM_TOPIC_REPLICATION", "1"))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            admin = KafkaAdminClient(client_id="trm-bootstrap", **cfg.kafka_python_kwargs())
            break
        except Exception as exc:  # NoBrokersAvailable, auth errors while a broker starts, ...
            if time.monotonic() > deadline:
                raise SystemExit(f"Kafka at {cfg.bootstrap_servers} not reachable after {wait_s:.0f}s: "
                                 f"{exc!r}; check TRM_KAFKA_BOOTSTRAP and the TRM_KAFKA_* security settings")
            time.sleep(2)
    plan = {cfg.topic(name): n for name, n in topic_plan().items()}
    try:
        result = admin.create_topics(
            {cfg.topic(name): {"num_partitions": n, "replication_factor": replication,
                               "configs": TOPIC_CONFIGS.get(name, {})} for name, n in topic_plan().items()},
            raise_errors=False)
        for topic in result["topics"]:
            code = topic["error_code"]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise SystemExit(f"creating topic {topic['name']} failed: error {code} "
                                 f"{topic.get('error_message')}")
        actual = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(plan))}
    finally:
        admin.close()
    for name, n in plan.items():
        state = "ok" if actual.get(name, 0) >= n else f"HAS {actual.get(name)} < planned (see README)"
        print(f"topic {name}: {actual.get(name)} partitions ({state})", flush=True)
    return actual


def assemble_feature_repo(out_dir: str | os.PathLike, *, definitions: str | os.PathLike | None = None,
                          store_yaml: str | os.PathLike | None = None) -> Path:
    """Build a Feast repo dir = the project's definitions (feature_repo/) + the production yaml.

    The definitions are owned by feature_repo/ and copied at deploy time, never forked, so the
    embedded and the production stores always hold the same feature views. The streams helper
    also seeds each view's offline part-file directory (<repo>/data/offline/<view>/), which in
    production is the shared volume: seeding is idempotent, so the init job re-runs it safely.
    """
    from streams.feature_repo_tools import materialize_repo

    store_yaml = Path(store_yaml or DEPLOY_DIR / "feature_repo_prod" / "feature_store.yaml")
    if not store_yaml.is_file():
        raise SystemExit(f"production feature_store.yaml not found at {store_yaml}")
    # Explicit source: in the image `streams` may be the site-packages copy, far from feature_repo/.
    repo = materialize_repo(out_dir, source=definitions or ROOT / "feature_repo", apply=False)
    shutil.copy2(store_yaml, repo / "feature_store.yaml")  # replaces the embedded SQLite config
    # `feast apply` imports every .py under the repo; keep caches and the data volume out of its walk.
    (repo / ".feastignore").write_text("__pycache__/\ndata/\n")
    return repo


def feast_apply(repo: str | os.PathLike) -> None:
    """`feast apply` in a subprocess, as the operator would run it (imports the definitions fresh)."""
    feast = shutil.which("feast") or str(Path(sys.executable).with_name("feast"))
    proc = subprocess.run([feast, "-c", str(repo), "apply"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"feast apply in {repo} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout.strip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", nargs="?", choices=["all", "topics", "feast", "assemble"], default="all")
    ap.add_argument("--repo", default=os.environ.get("TRM_FEAST_REPO", "/app/feature_repo_prod"),
                    help="where the assembled Feast repo lives (TRM_FEAST_REPO)")
    ap.add_argument("--no-assemble", action="store_true",
                    help="apply --repo as is (it was assembled at image build time)")
    args = ap.parse_args(argv)
    if args.step in ("all", "topics"):
        create_topics()
    if args.step == "assemble":
        print(assemble_feature_repo(args.repo))
    if args.step in ("all", "feast"):
        repo = Path(args.repo) if args.no_assemble else assemble_feature_repo(args.repo)
        feast_apply(repo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
