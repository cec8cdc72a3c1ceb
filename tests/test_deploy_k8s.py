"""deploy/k8s: the kustomize base and overlay parse, and everything they reference exists.

No cluster or kustomize binary here; these are the checks `kubectl apply -k` would fail on at
deploy time (a missing resource file, a Secret/ConfigMap/PVC a pod names but nobody defines, a
CA path no volume provides, a container command the CLI rejects), made at test time instead.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from trm import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
BASE = K8S / "base"
PROD_YAML = REPO_ROOT / "deploy" / "feature_repo_prod" / "feature_store.yaml"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        path = BASE / res
        assert path.is_file(), f"kustomization lists {res}, which does not exist"
        docs += _docs(path)
    return docs


def _by_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict) -> list[dict]:
    pod = _pod(workload)
    return pod.get("initContainers", []) + pod["containers"]


def _env_names(container: dict, docs) -> set[str]:
    """Env var names a container gets from env + envFrom (ConfigMaps and Secrets in the base)."""
    names = {e["name"] for e in container.get("env", [])}
    cms, secrets = _by_kind(docs, "ConfigMap"), _by_kind(docs, "Secret")
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            names |= set(cms[src["configMapRef"]["name"]]["data"])
        if "secretRef" in src:
            names |= set(secrets[src["secretRef"]["name"]]["stringData"])
    return names


def test_every_yaml_file_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        for doc in _docs(f):
            assert "apiVersion" in doc and "kind" in doc, f


def test_base_has_the_workloads(base):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in base}
    assert ("Deployment", "trm-worker") in kinds
    assert ("StatefulSet", "trm-trainer") in kinds
    assert ("Job", "trm-init") in kinds
    assert ("Job", "trm-tokenizer-fit") in kinds
    assert ("ConfigMap", "trm-config") in kinds
    assert ("Deployment", "trm-server") in kinds and ("Service", "trm-server") in kinds
    trainer = _by_kind(base, "StatefulSet")["trm-trainer"]
    assert trainer["spec"]["replicas"] == 1, "one trainer owns the model and its offsets"
    assert trainer["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "checkpoints"


def test_references_resolve(base):
    cms, secrets, pvcs = _by_kind(base, "ConfigMap"), _by_kind(base, "Secret"), _by_kind(base, "PersistentVolumeClaim")
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    images = {i["name"] for i in kust["images"]}
    for w in _workloads(base):
        name, pod = w["metadata"]["name"], _pod(w)
        if w["kind"] != "Job":
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}: selector/labels"
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{name}: secret {v['secret']['secretName']}"
            if "configMap" in v:
                assert v["configMap"]["name"] in cms
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: PVC {v}"
        for c in _containers(w):
            assert c["image"] in images, f"{name}/{c['name']}: image {c['image']} not managed by kustomization"
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                assert ref["name"] in (cms if "configMapRef" in src else secrets), f"{name}: {ref}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in templates, f"{name}/{c['name']}: mount {m['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name


def test_secrets_are_marked_templates(base):
    secrets = _by_kind(base, "Secret")
    assert {"trm-kafka-sasl", "trm-kafka-ca", "trm-store-credentials"} <= set(secrets)
    for name, s in secrets.items():
        assert "data" not in s, f"{name}: use stringData placeholders, never encoded real values"
        for key, value in s["stringData"].items():
            assert "REPLACE_ME" in value, f"{name}.{key} must be an obvious placeholder"
    assert set(secrets["trm-kafka-sasl"]["stringData"]) == {"TRM_KAFKA_SASL_USERNAME", "TRM_KAFKA_SASL_PASSWORD"}


def test_kafka_security_settings_reach_every_container(base):
    """SASL_SSL settings + the CA file path, mounted from the CA Secret, in every TRM container."""
    cm = _by_kind(base, "ConfigMap")["trm-config"]["data"]
    assert cm["TRM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cm["TRM_KAFKA_SASL_MECHANISM"] in ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
    ca_dir, ca_key = cm["TRM_KAFKA_SSL_CAFILE"].rsplit("/", 1)
    ca_secret = _by_kind(base, "Secret")["trm-kafka-ca"]
    assert ca_key in ca_secret["stringData"], "the CA file name must be a key of the CA Secret"
    required = {"TRM_KAFKA_BOOTSTRAP", "TRM_KAFKA_SECURITY_PROTOCOL", "TRM_KAFKA_SASL_MECHANISM",
                "TRM_KAFKA_SASL_USERNAME", "TRM_KAFKA_SASL_PASSWORD", "TRM_KAFKA_SSL_CAFILE"}
    for w in _workloads(base):
        volumes = {v["name"]: v for v in _pod(w)["volumes"]}
        for c in _containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            assert required <= _env_names(c, base), f"{where} lacks {required - _env_names(c, base)}"
            mounts = [m for m in c["volumeMounts"] if m["mountPath"] == ca_dir]
            assert mounts, f"{where} does not mount the CA at {ca_dir}"
            assert volumes[mounts[0]["name"]]["secret"]["secretName"] == "trm-kafka-ca"


def test_feature_store_variables_are_provided(base):
    body = "\n".join(line.split("#", 1)[0] for line in PROD_YAML.read_text().splitlines())
    needed = set(re.findall(r"\$\{(\w+)\}", body))
    assert needed
    for w in _workloads(base):
        main = _pod(w)["containers"][0]
        assert needed <= _env_names(main, base), f"{w['metadata']['name']} lacks {needed - _env_names(main, base)}"


def test_offline_and_state_volumes_are_shared(base):
    from streams.feast_sink import offline_dir

    pvcs = _by_kind(base, "PersistentVolumeClaim")
    for name in ("trm-offline", "trm-stream-state", "trm-artifacts"):
        assert pvcs[name]["spec"]["accessModes"] == ["ReadWriteMany"], f"{name} is shared by several pods"
    cm = _by_kind(base, "ConfigMap")["trm-config"]["data"]
    target = str(offline_dir(cm["TRM_FEAST_REPO"], "x").parent)
    for w in _workloads(base):
        if w["metadata"]["name"] == "trm-tokenizer-fit":  # reads the catalogue, not the feature store
            continue
        pod = _pod(w)
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get(target)) == "trm-offline", f"{w['metadata']['name']}: offline store not at {target}"


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


@pytest.mark.parametrize("name", ["trm-worker", "trm-trainer", "trm-server"])
def test_container_args_parse_with_the_real_cli(base, name):
    from trm.cli import build_parser

    w = next(d for d in _workloads(base) if d["metadata"]["name"] == name)
    cm = _by_kind(base, "ConfigMap")["trm-config"]["data"]
    argv = _expand(_pod(w)["containers"][0]["args"], cm)
    parser = build_parser()
    if argv[0] not in parser._subparsers._group_actions[0].choices:
        pytest.skip(f"`trm {argv[0]}` is not implemented yet")
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`trm {' '.join(argv)}` is rejected by the CLI (exit {exc.code}); fix {name}'s args")


def test_tokenizer_job_writes_where_the_workers_read(base):
    from trm.cli import build_parser

    job = _by_kind(base, "Job")["trm-tokenizer-fit"]
    cm = _by_kind(base, "ConfigMap")["trm-config"]["data"]
    script = _pod(job)["containers"][0]["command"][2].replace('"$TRM_TOKENIZER_ARTIFACT"', cm["TRM_TOKENIZER_ARTIFACT"])
    argv = script.split("||")[-1].split()
    args = build_parser().parse_args(argv[1:])
    assert args.out == cm["TRM_TOKENIZER_ARTIFACT"]
    mount = next(m for m in _pod(job)["containers"][0]["volumeMounts"] if m["name"] == "artifacts")
    assert args.out.startswith(mount["mountPath"] + "/") and not mount.get("readOnly")


def test_init_job_and_probes_call_shipped_scripts(base):
    sys.path.insert(0, str(REPO_ROOT / "deploy"))
    import healthcheck

    job = _by_kind(base, "Job")["trm-init"]
    cmd = _pod(job)["containers"][0]["command"]
    assert cmd[:2] == ["python", "/app/deploy/bootstrap.py"]
    for w in _workloads(base):
        for c in _containers(w):
            probe = c.get("livenessProbe", {}).get("exec", {}).get("command", [])
            if probe:
                assert probe[1] == "/app/deploy/healthcheck.py"
                assert all(a in healthcheck.CHECKS or a.startswith(healthcheck.PREFIXED) for a in probe[2:]), probe


def test_overlay_targets_exist(base):
    overlay_dir = K8S / "overlays" / "production"
    kust = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    assert all((overlay_dir / r).resolve().is_dir() or (overlay_dir / r).is_file() for r in kust["resources"])
    names = {(d["kind"], d["metadata"]["name"]) for d in base}
    for patch in kust.get("patches", []):
        doc = yaml.safe_load((overlay_dir / patch["path"]).read_text())
        assert (doc["kind"], doc["metadata"]["name"]) in names, f"patch targets nothing: {patch}"
        if doc["kind"] == "ConfigMap":
            base_keys = set(_by_kind(base, "ConfigMap")[doc["metadata"]["name"]]["data"])
            assert set(doc["data"]) <= base_keys, f"overlay sets unknown keys {set(doc['data']) - base_keys}"
    for r in kust.get("replicas", []):
        assert ("Deployment", r["name"]) in names
    kust_base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert {i["name"] for i in kust["images"]} <= {i["name"] for i in kust_base["images"]}


def test_shell_commands_are_valid_sh(base):
    """`sh -n` every `sh -c` script in the manifests (and compose), as the image's /bin/sh would parse it."""
    import shutil
    import subprocess

    scripts = [c["command"][2] for w in _workloads(base) for c in _containers(w)
               if c.get("command", [])[:2] == ["sh", "-c"]]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    scripts += [s["command"][0].replace("$$", "$") for s in compose.values() if s.get("entrypoint") == ["sh", "-c"]]
    assert len(scripts) >= 4
    sh = shutil.which("dash") or shutil.which("sh")  # python:3.11-slim's /bin/sh is dash
    for script in scripts:
        r = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, f"{script!r}: {r.stderr}"


def _parse(base, name: str):
    from trm.cli import build_parser

    w = next(d for d in _workloads(base) if d["metadata"]["name"] == name)
    cm = _by_kind(base, "ConfigMap")["trm-config"]["data"]
    return w, build_parser().parse_args(_expand(_pod(w)["containers"][0]["args"], cm))


def _mount_of(workload: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) of the main container's mount holding `path`."""
    pod = _pod(workload)
    volumes = {v["name"]: v for v in pod["volumes"]}
    m = next(m for m in pod["containers"][0]["volumeMounts"]
             if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"))
    return m, volumes[m["name"]]


def test_server_reads_what_the_trainer_publishes_read_only(base):
    server, sargs = _parse(base, "trm-server")
    trainer, targs = _parse(base, "trm-trainer")
    published = targs.models_dir or str(Path(targs.checkpoint_dir).parent / "models")
    assert sargs.models == published, (sargs.models, published)
    cm = _by_kind(base, "ConfigMap")["trm-config"]["data"]
    assert sargs.repo == cm["TRM_FEAST_REPO"], "TRM_FEAST_REPO wins over --repo: keep them equal"
    smount, svol = _mount_of(server, sargs.models)
    tmount, tvol = _mount_of(trainer, published)
    assert smount.get("readOnly") is True, "the server only reads the published versions"
    assert not tmount.get("readOnly")
    assert "persistentVolumeClaim" in svol and "persistentVolumeClaim" in tvol, \
        "a per-pod volume (the trainer's checkpoints) cannot be shared with the server"
    claim = svol["persistentVolumeClaim"]["claimName"]
    assert claim == tvol["persistentVolumeClaim"]["claimName"]
    pvc = _by_kind(base, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "one trainer writes, every server replica reads"
    assert all(m.get("readOnly") for m in _pod(server)["containers"][0]["volumeMounts"]), "the server writes nothing"


def test_server_probes_and_service(base):
    server = _by_kind(base, "Deployment")["trm-server"]
    c = _pod(server)["containers"][0]
    _, args = _parse(base, "trm-server")
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert {"containerPort": 8000, "name": "http"} in c["ports"]
    ready = c["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/healthz", 8000), "ready = a version loaded and the store answering"
    live = c["livenessProbe"]["httpGet"]
    assert live["port"] == 8000 and live["path"] in ("/healthz", "/metrics")
    assert "limits" in c["resources"] and "memory" in c["resources"]["limits"]
    svc = _by_kind(base, "Service")["trm-server"]
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the Service selects the server pods"
    port = svc["spec"]["ports"][0]
    assert port["port"] == 8000 and port["targetPort"] in ("http", 8000)


def test_prometheus_scrapes_the_server_the_workers_and_the_trainer():
    """Every job targets a compose service on the port that service's command serves /metrics on."""
    cfg = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"trm-server", "trm-worker", "trm-trainer"}
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {"trm-server": [t for sc in jobs["trm-server"]["static_configs"] for t in sc["targets"]],
               "trm-trainer": [t for sc in jobs["trm-trainer"]["static_configs"] for t in sc["targets"]],
               "trm-worker": [f"{n}:{sd['port']}" for sd in jobs["trm-worker"]["dns_sd_configs"] for n in sd["names"]]}
    for job, ts in targets.items():
        assert ts, job
        for t in ts:
            host, port = t.rsplit(":", 1)
            assert host in compose, t
            cmd = compose[host].get("command")
            text = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
            if job == "trm-server":
                assert port == "8000", t
            else:
                assert f"--metrics-port {port}" in text and "--metrics-host 0.0.0.0" in text, (t, text)


def test_rotation_job_records_where_every_worker_reads_and_its_commands_parse(base):
    """The rotation template (a suspended CronJob: `kubectl create job --from=cronjob/...`) writes
    the record at $TRM_ROTATION_FILE on the artifacts volume, which every worker mounts; it writes
    the offline store where the definitions read; its two commands parse with the real CLI."""
    from streams.feast_sink import offline_dir
    from trm.cli import build_parser

    cron = _by_kind(base, "CronJob")["trm-tokenizer-rotate"]
    assert cron["spec"]["suspend"] is True
    job = {"kind": "Job", "metadata": {"name": "rotate"}, "spec": cron["spec"]["jobTemplate"]["spec"]}
    pod, c = _pod(job), _pod(job)["containers"][0]
    cms, pvcs = _by_kind(base, "ConfigMap"), _by_kind(base, "PersistentVolumeClaim")
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert c["image"] in {i["name"] for i in kust["images"]}
    env = {}
    for src in c["envFrom"]:
        if "configMapRef" in src:
            env.update(cms[src["configMapRef"]["name"]]["data"])
    assert {"TRM_ROTATION_FILE", "TRM_ROTATION_ARTIFACT", "TRM_ROTATION_AT", "TRM_FEAST_REPO"} <= set(env)
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims.values()) <= set(pvcs)

    def claim_of(container, path, pod_claims):  # the PVC a path is on, and whether it is mounted writable
        for m in container["volumeMounts"]:
            if path.startswith(m["mountPath"] + "/"):
                return pod_claims.get(m["name"]), not m.get("readOnly")
        return None, False

    record = env["TRM_ROTATION_FILE"]
    assert claim_of(c, record, claims) == ("trm-artifacts", True)
    assert claim_of(c, env["TRM_ROTATION_ARTIFACT"], claims) == ("trm-artifacts", True)
    offline = str(offline_dir(env["TRM_FEAST_REPO"], "x"))
    assert claim_of(c, offline, claims) == ("trm-offline", True)
    for w in _workloads(base):  # every pod that runs a worker reads the same record
        if w["metadata"]["name"] == "trm-worker":
            wc = _pod(w)["containers"][0]
            wclaims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in _pod(w)["volumes"]
                       if "persistentVolumeClaim" in v}
            assert claim_of(wc, record, wclaims)[0] == "trm-artifacts"
    script = c["command"][2].replace('${TRM_ROTATION_FROM:+--from "$TRM_ROTATION_FROM"}',
                                     "--from /var/lib/trm/artifacts/tokenizer")  # as a first rotation runs it
    for name, value in env.items():
        script = script.replace(f'"${name}"', value)
    parser = build_parser()
    for cmd in script.split("&&"):
        argv = cmd.split()
        assert argv[0] == "trm"
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"`{cmd.strip()}` is rejected by the CLI (exit {exc.code})")
