"""docker-compose.yml and deploy/Dockerfile, checked structurally (no Docker engine runs here).

What a `docker compose up` would only reveal at runtime is checked here: KRaft settings that agree
with each other, health checks that call binaries present in their images, TRM_* wiring that
matches streams/kafka_config.py, trm/config.py and feature_store.yaml, commands that the real `trm` CLI parser accepts,
and a worker service that can be scaled.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from trm import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
PROD_YAML = REPO_ROOT / "deploy" / "feature_repo_prod" / "feature_store.yaml"
sys.path.insert(0, str(REPO_ROOT / "deploy"))
import bootstrap  # noqa: E402  (deploy/ is scripts, not a package)
import healthcheck  # noqa: E402

# Executables known to be in each image (from the images' own Dockerfiles / packages).
IMAGE_COMMANDS = {
    "apache/kafka": {"/opt/kafka/bin/kafka-broker-api-versions.sh", "/opt/kafka/bin/kafka-topics.sh",
                     "/opt/kafka/bin/kafka-consumer-groups.sh", "/opt/kafka/bin/kafka-server-start.sh"},
    "redis": {"redis-cli", "redis-server"},
    "postgres": {"pg_isready", "psql", "postgres"},
    "trm-stream": {"python", "trm", "sh", "feast"},  # python:3.11-slim + `pip install .`
}
APP_SERVICES = ("init", "tokenizer", "worker", "trainer", "server")
KAFKA_ENV = {"TRM_KAFKA_BOOTSTRAP", "TRM_KAFKA_SECURITY_PROTOCOL", "TRM_TOPIC_PREFIX",
             "TRM_KAFKA_SESSION_TIMEOUT_MS"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _image_family(svc: dict) -> str:
    image = svc.get("image", "")
    for family in IMAGE_COMMANDS:
        if image == family or image.startswith(family + ":"):
            return family
    raise AssertionError(f"image {image!r} has no known command list")


def _health_argv(svc: dict) -> list[str]:
    test = svc["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:] if test[0] == "CMD" else shlex.split(test[1])


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    assert isinstance(env, dict), "use the mapping form so anchors merge"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def yaml_vars(path: Path) -> set[str]:
    """${VAR}s Feast substitutes in a feature_store.yaml (comments excluded)."""
    body = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    return set(re.findall(r"\$\{(\w+)\}", body))


def _config_env_names() -> set[str]:
    """Every TRM_* variable the code reads (config, bootstrap, healthcheck, the rotation record)."""
    names: set[str] = set()
    for path in (REPO_ROOT / "streams" / "kafka_config.py", REPO_ROOT / "trm" / "config.py",
                 REPO_ROOT / "streams" / "contract" / "topics.py", REPO_ROOT / "deploy" / "bootstrap.py",
                 REPO_ROOT / "streams" / "rotation.py"):
        names |= set(re.findall(r'"(TRM_[A-Z_]+)"', path.read_text()))
    return names


def test_services_present(services):
    assert {"kafka", "redis", "postgres", "init", "worker", "trainer", "server"} <= set(services)


def test_kafka_runs_kraft_single_node(services):
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and not kafka["image"].endswith(":latest")
    env = _env(kafka)
    assert not any("ZOOKEEPER" in k for k in env), "KRaft mode: no ZooKeeper settings"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voter_id, _, voter_addr = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert voter_id == node_id, "the only voter must be this node"
    listeners = dict(l.split("://") for l in env["KAFKA_LISTENERS"].split(","))
    protocol_map = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocol_map), "every listener needs a security protocol"
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and voter_addr.endswith(listeners[controller].rsplit(":", 1)[-1])
    assert voter_addr.split(":")[0] in (kafka.get("hostname"), "kafka")
    advertised = dict(l.split("://") for l in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert controller not in advertised, "the controller listener is not advertised to clients"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert env["CLUSTER_ID"], "a fixed CLUSTER_ID lets the data volume be reused"
    # single broker: replicated internal topics would never become available
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1"
    # clients inside compose must reach an advertised listener
    bootstrap_addr = _env(services["worker"])["TRM_KAFKA_BOOTSTRAP"]
    assert bootstrap_addr in advertised.values(), (bootstrap_addr, advertised)
    assert any(v.endswith(env["KAFKA_LOG_DIRS"]) for v in kafka.get("volumes", [])), "broker data must be a volume"


@pytest.mark.parametrize("name", ["kafka", "redis", "postgres", "worker", "trainer", "server"])
def test_healthchecks_call_commands_in_their_image(services, name):
    svc = services[name]
    argv = _health_argv(svc)
    family = _image_family(svc)
    assert argv[0] in IMAGE_COMMANDS[family], f"{name}: {argv[0]} is not in the {family} image"
    for key in ("interval", "timeout", "retries"):
        assert key in svc["healthcheck"], f"{name}: healthcheck.{key}"
    if family == "trm-stream":  # our own checks: the script ships in the image and knows each check
        assert argv[1] == "/app/deploy/healthcheck.py" and (REPO_ROOT / "deploy" / "healthcheck.py").is_file()
        for check in argv[2:]:
            assert check in healthcheck.CHECKS or check.startswith(healthcheck.PREFIXED), check
    if family == "apache/kafka":
        assert "localhost:9092" in argv, "probe the broker's own listener"
    if family == "postgres":
        env = _env(svc)
        assert env["POSTGRES_USER"] in argv and env["POSTGRES_DB"] in argv


def test_restart_policies(services):
    for name, svc in services.items():
        one_shot = name in ("init", "tokenizer")
        assert svc.get("restart") in (("on-failure",) if one_shot else ("unless-stopped", "always")), name


def test_depends_on_conditions(services):
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            assert cond in ("service_started", "service_healthy", "service_completed_successfully")
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} health, which has no check"
            if cond == "service_completed_successfully":
                assert dep in ("init", "tokenizer"), f"{dep} never completes"
    assert services["init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["trainer"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_worker_is_scalable(services):
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name breaks --scale worker=N"
    assert not worker.get("ports"), "a fixed host port breaks --scale worker=N"
    assert "hostname" not in worker
    # named volumes only: shared state, not a per-container bind of one path
    for vol in worker.get("volumes", []):
        assert not vol.startswith(("/", ".")), vol


def test_app_services_share_the_image_and_settings(services, compose):
    for name in APP_SERVICES:
        svc = services[name]
        assert svc["image"] == "trm-stream:latest" and svc["build"]["dockerfile"] == "deploy/Dockerfile"
        env = _env(svc)
        missing = KAFKA_ENV - set(env)
        assert not missing, f"{name} lacks {missing}"
        unknown = {k for k in env if k.startswith("TRM_")} - _config_env_names()
        assert not unknown, f"{name} sets TRM_ variables no code reads (typo?): {unknown}"
        assert env["TRM_FEAST_REPO"] == "/app/feature_repo_prod"
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith(("/", ".")):
                assert src in compose["volumes"], f"{name} mounts undeclared volume {src}"


def test_store_settings_match_the_store_services(services):
    worker, pg = _env(services["worker"]), _env(services["postgres"])
    assert worker["REDIS_HOST"] == "redis" and worker["REDIS_PORT"] == "6379"
    assert worker["FEAST_REGISTRY_HOST"] == "postgres" and worker["FEAST_REGISTRY_PORT"] == "5432"
    assert worker["FEAST_REGISTRY_USER"] == pg["POSTGRES_USER"]
    assert worker["FEAST_REGISTRY_DB"] == pg["POSTGRES_DB"]
    assert worker["FEAST_REGISTRY_PASSWORD"] == pg["POSTGRES_PASSWORD"]
    # every ${VAR} in the production feature_store.yaml is set for each process that opens it
    needed = yaml_vars(PROD_YAML)
    assert {"REDIS_HOST", "FEAST_REGISTRY_HOST"} <= needed
    for name in APP_SERVICES:
        assert needed <= set(_env(services[name])), f"{name} lacks {needed - set(_env(services[name]))}"


def test_offline_volume_is_where_the_definitions_write(services):
    """Workers append parquet parts under <repo>/data/offline; the trainer reads the same files."""
    from streams.feast_sink import offline_dir

    target = str(offline_dir("/app/feature_repo_prod", "x").parent)
    for name in ("init", "worker", "trainer"):
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert mounts.get(target) == "offline-data", f"{name} does not mount offline-data at {target}"


def test_init_creates_planned_topics(services, monkeypatch):
    init = services["init"]
    assert init["entrypoint"][-1] == "/app/deploy/bootstrap.py"
    assert (REPO_ROOT / "deploy" / "bootstrap.py").is_file()
    monkeypatch.setenv("TRM_TOPIC_PARTITIONS", _env(init)["TRM_TOPIC_PARTITIONS"])
    plan = bootstrap.topic_plan_from_env()
    from streams.contract.topics import TOPICS

    assert set(plan) == set(TOPICS), "production topics must match the streams contract"
    assert plan["interactions"] >= 6, "interactions partitions cap the number of busy workers"
    assert plan["items.dlq"] >= 1 and plan["interactions.dlq"] >= 1
    monkeypatch.setenv("TRM_TOPIC_PARTITIONS", "interactions=zero")
    with pytest.raises(SystemExit, match="TRM_TOPIC_PARTITIONS"):
        bootstrap.topic_plan_from_env()


def _trm_argv(svc: dict) -> list[str]:
    """The argv the service passes to `trm`, with $VARs from its environment substituted."""
    env = _env(svc)
    entry, cmd = svc.get("entrypoint"), svc.get("command")
    if entry == ["sh", "-c"]:
        script = re.sub(r"\$\$?\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), cmd[0])
        words = shlex.split(script.split("||")[-1])
        return words[words.index("trm") + 1:]
    assert entry is None, "the image's ENTRYPOINT is trm"
    return list(cmd)


@pytest.mark.parametrize("name", ["worker", "trainer", "tokenizer", "server"])
def test_service_commands_parse_with_the_real_cli(services, name):
    from trm.cli import build_parser

    argv = _trm_argv(services[name])
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    if argv[0] not in sub:
        pytest.skip(f"`trm {argv[0]}` is not implemented yet")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`trm {' '.join(argv)}` is rejected by the CLI (exit {exc.code}); "
                    f"fix the {name} command in docker-compose.yml")
    assert args.command == argv[0]
    mounts = [v.split(":")[1] for v in services[name].get("volumes", [])]

    def on_volume(path: str) -> bool:
        return any(path == m or path.startswith(m + "/") for m in mounts)

    if name == "worker":
        assert args.repo == "/app/feature_repo_prod"
        assert args.tokenizer == _env(services[name])["TRM_TOKENIZER_ARTIFACT"]
        assert on_volume(args.state), "the per-partition state must outlive the container"
    if name == "trainer":
        assert on_volume(args.checkpoint_dir), "checkpoints must outlive the container"
        assert on_volume(str(Path(args.checkpoint_dir).parent / "models")), "published models too"
    if name == "tokenizer":
        assert on_volume(args.out) and args.out == _env(services[name])["TRM_TOKENIZER_ARTIFACT"]
    if name == "server":
        assert args.repo == _env(services[name])["TRM_FEAST_REPO"], "TRM_FEAST_REPO wins over --repo: keep them equal"
        assert on_volume(args.models) and (args.host, args.port) == ("0.0.0.0", 8000)


def _mounts(svc: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for v in svc.get("volumes", []):
        src, dst, *mode = v.split(":")
        out[dst] = (src, mode[0] if mode else "rw")
    return out


def test_server_reads_the_trainers_published_models_read_only(services):
    from trm.cli import build_parser

    server, trainer = services["server"], services["trainer"]
    assert server["image"] == trainer["image"] and server["build"] == trainer["build"]
    args = build_parser().parse_args(_trm_argv(server))
    targs = build_parser().parse_args(_trm_argv(trainer))
    published = targs.models_dir or str(Path(targs.checkpoint_dir).parent / "models")  # `trm train`'s default
    assert args.models == published, (args.models, published)
    smounts, tmounts = _mounts(server), _mounts(trainer)
    src = next((smounts[m] for m in smounts if args.models == m or args.models.startswith(m + "/")), None)
    assert src is not None, "the server does not mount the models"
    tsrc = next(tmounts[m] for m in tmounts if published.startswith(m + "/"))
    assert src[0] == tsrc[0], "the server must mount the volume the trainer publishes to"
    assert src[1] == "ro", "the server only reads the published versions"
    for dst, (_, mode) in smounts.items():
        assert mode == "ro", f"the server writes nothing: mount {dst} read-only"


def test_server_waits_for_the_stores_and_checks_healthz(services):
    server = services["server"]
    deps = server["depends_on"]
    for store in ("redis", "postgres"):
        assert deps[store]["condition"] == "service_healthy", store
    assert deps["init"]["condition"] == "service_completed_successfully", "feast apply must have run"
    argv = _health_argv(server)
    assert argv[:2] == ["python", "/app/deploy/healthcheck.py"]
    url = next(a[5:] for a in argv[2:] if a.startswith("http="))
    assert url == "http://127.0.0.1:8000/healthz"
    assert any(p.split(":")[-1] == "8000" for p in server.get("ports", [])), "the service port is published"


def test_healthcheck_http_check(tmp_path):
    """deploy/healthcheck.py http=URL: 2xx passes, a 503 fails with the body, no listener fails."""
    import http.server
    import socket
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/ok" else 503
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"reason": "no version"}')

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert healthcheck.main([f"http={base}/ok"]) == 0
        assert healthcheck.main([f"http={base}/healthz"]) == 1
    finally:
        srv.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert healthcheck.main([f"http=http://127.0.0.1:{closed}/healthz"]) == 1


# ------------------------------------------------------------------------------ Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_cpu_torch_before_the_package():
    steps = _dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [rest for op, rest in steps if op == "RUN"]
    torch_i = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    pkg_i = next(i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r))
    assert torch_i < pkg_i, "torch must be installed before `pip install .`"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_i]
    # the pin satisfies the package's own torch range, so pip keeps the CPU wheel
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"torch(>=[\d.]+,<[\d.]+)"', pyproject).group(1)
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(spec), f"torch==2.13.0 is outside pyproject's range {spec}"


def test_dockerfile_env_matches_compose(services):
    env_lines = " ".join(rest for op, rest in _dockerfile_instructions() if op == "ENV")
    image_env = dict(re.findall(r"(\w+)=(\S+)", env_lines))
    assert image_env["TRM_FEAST_REPO"] == _env(services["worker"])["TRM_FEAST_REPO"]
    assert image_env["TRM_TOKENIZER_ARTIFACT"] == _env(services["worker"])["TRM_TOKENIZER_ARTIFACT"]
    steps = _dockerfile_instructions()
    assert ("USER", "trm") in steps, "run as a non-root user"
    assert any("bootstrap.py assemble --repo /app/feature_repo_prod" in r for op, r in steps if op == "RUN")


def test_dockerignore_keeps_what_the_image_needs():
    ignore = (REPO_ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    for needed in ("deploy", "feature_repo", "streams", "trm", "pyproject.toml", "data"):
        assert needed not in ignore, f"{needed} is needed in the image"


def test_bootstrap_requests_partitions_replication_and_topic_configs(monkeypatch):
    """What init sends to Kafka (a fake admin client records it; Tansu ignores topic configs)."""
    import kafka.admin

    from streams.kafka_config import KafkaConfig

    sent = {}

    class FakeAdmin:
        def __init__(self, **kw):
            sent["client"] = kw

        def create_topics(self, topics, raise_errors=True):
            sent["topics"] = topics
            return {"topics": [{"name": n, "error_code": 36 if n.endswith("items") else 0} for n in topics]}

        def describe_topics(self, names):
            return [{"name": n, "partitions": [{}] * sent["topics"][n]["num_partitions"]} for n in names]

        def close(self):
            sent["closed"] = True

    monkeypatch.setattr(kafka.admin, "KafkaAdminClient", FakeAdmin)
    monkeypatch.delenv("TRM_TOPIC_PARTITIONS", raising=False)
    cfg = KafkaConfig(bootstrap_servers="k1:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="u", sasl_password="p", topic_prefix="prod.")
    actual = bootstrap.create_topics(cfg, replication=3, wait_s=1)
    assert sent["closed"] and sent["client"]["sasl_mechanism"] == "SCRAM-SHA-512"
    assert sent["client"]["security_protocol"] == "SASL_SSL"
    topics = sent["topics"]
    assert set(topics) == {f"prod.{t}" for t in bootstrap.DEFAULT_PARTITIONS}
    assert all(t["replication_factor"] == 3 for t in topics.values())
    assert topics["prod.item_tokens"]["configs"] == {"cleanup.policy": "compact"}, \
        "workers rebuild their token cache from item_tokens: it must keep every item's latest tokens"
    assert topics["prod.items.dlq"]["configs"].get("cleanup.policy") != "compact", "DLQ keys may be null"
    assert actual["prod.interactions"] == 6


def test_long_running_app_services_get_time_to_finish_a_batch(services):
    def seconds(v: str) -> int:
        return int(v[:-1]) * (60 if v.endswith("m") else 1)

    assert seconds(services["worker"]["stop_grace_period"]) >= 30, "the default 10 s can cut a Feast write"
    assert seconds(services["trainer"]["stop_grace_period"]) >= 60


def test_processes_that_load_the_tokenizer_wait_for_it(services):
    for name in ("worker", "trainer"):
        assert services[name]["depends_on"]["tokenizer"]["condition"] == "service_completed_successfully", name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        artifact = _env(services[name])["TRM_TOKENIZER_ARTIFACT"]
        assert any(artifact.startswith(m + "/") and src == "artifacts" for m, src in mounts.items()), name
