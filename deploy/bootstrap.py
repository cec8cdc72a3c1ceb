"""One-shot cluster bootstrap: create the Kafka topics, assemble the production Feast repo, `feast apply`.

Run by the compose `init` service and the Kubernetes `trm-init` Job before any worker starts:

    python deploy/bootstrap.py                # topics + feast apply
    python deploy/bootstrap.py topics         # only the topics
    python deploy/bootstrap.py feast          # only assemble + apply
    python deploy/bootstrap.py assemble       # only build the repo dir (the Dockerfile does this)

Every setting comes from the environment (streams/kafka_config.py), so the same script bootstraps a local
compose stack and a SASL_SSL production cluster. Idempotent: re-running changes nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
ROOT = DEPLOY_DIR.parent
if str(ROOT) not in sys.path:  # run as a script from a source checkout or /app in the image
    sys.path.insert(0, str(ROOT))

from streams.contract.topics import PRODUCTION, TopicError, production_replication, topic_plan  # noqa: E402

# The production partition counts and topic configs are the contract's (streams/contract/topics.py);
# TRM_TOPIC_PARTITIONS="interactions=12,items=6" overrides counts, TRM_TOPIC_REPLICATION the factor.
DEFAULT_PARTITIONS = topic_plan(PRODUCTION)


def topic_plan_from_env(env: dict | None = None) -> dict[str, int]:
    """The production plan with TRM_TOPIC_PARTITIONS applied; a bad entry exits naming it."""
    try:
        return topic_plan(PRODUCTION, os.environ if env is None else env)
    except TopicError as exc:
        raise SystemExit(str(exc)) from exc


def create_topics(cfg=None, *, replication: int | None = None, wait_s: float = 120.0) -> dict[str, int]:
    """Create every project topic with its production partition count and config; return
    {full topic name: partitions it has}. Existing topics are kept; one with fewer partitions than
    planned is reported, not altered (see deploy/README.md)."""
    from streams.contract import topics
    from streams.kafka_config import KafkaConfig

    cfg = cfg or KafkaConfig.from_env()
    plan = topic_plan_from_env()
    try:
        actual = topics.create_topics(cfg, plan, replication=replication or production_replication(), wait_s=wait_s)
    except TopicError as exc:
        raise SystemExit(str(exc)) from exc
    for name, n in plan.items():
        full = cfg.topic(name)
        state = "ok" if actual.get(full, 0) >= n else f"HAS {actual.get(full)} < planned (see README)"
        print(f"topic {full}: {actual.get(full)} partitions ({state})", flush=True)
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
