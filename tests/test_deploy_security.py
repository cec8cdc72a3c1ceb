"""Kafka security settings (SASL_SSL, SCRAM/PLAIN, CA file) reach every client the project creates.

No secured broker runs here, so each client library is exercised up to the network: the real
client objects are constructed from `KafkaConfig.from_env()` and inspected, the SASL mechanism
object the client would authenticate with is built from the same kwargs, and the SSL context
each client would wrap its socket with performs a real TLS handshake against a loopback server
whose certificate is signed by a freshly generated CA (and refuses one that is not).
"""
from __future__ import annotations

import ast
import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from streams.kafka_config import KafkaConfig
from trm import REPO_ROOT

SECURE_ENV = {
    "TRM_KAFKA_BOOTSTRAP": "b-1.kafka.test:9096,b-2.kafka.test:9096",
    "TRM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "TRM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "TRM_KAFKA_SASL_USERNAME": "trm-svc",
    "TRM_KAFKA_SASL_PASSWORD": "s3cr3t-pw",
    "TRM_TOPIC_PREFIX": "prod.",
}


def _openssl_cert(dirpath: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA-capable certificate for localhost/127.0.0.1 (its own trust anchor)."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.fail("openssl CLI not found: apt-get install openssl", pytrace=False)
    cert, key = dirpath / f"{name}.crt", dirpath / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1",
         "-subj", f"/CN=localhost/O={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kafka-ca")
    return {"ca": _openssl_cert(d, "trm-test-ca"), "rogue": _openssl_cert(d, "rogue-ca")}


@pytest.fixture
def secure_cfg(monkeypatch, certs) -> KafkaConfig:
    for k, v in SECURE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TRM_KAFKA_SSL_CAFILE", str(certs["ca"][0]))
    return KafkaConfig.from_env()


def _tls_server(cert: Path, key: Path):
    """Loopback TLS server accepting one handshake; returns (port, thread, result dict)."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(10)
    result: dict = {}

    def serve():
        try:
            conn, _ = lsock.accept()
            with sctx.wrap_socket(conn, server_side=True) as tls:
                result["ok"] = True
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc
        finally:
            lsock.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lsock.getsockname()[1], t, result


def _handshake(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """TLS handshake with `ctx` as the client against a server presenting `cert`; raises on failure."""
    port, thread, _ = _tls_server(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        thread.join(10)


def _assert_trusts_only_ca(ctx: ssl.SSLContext, certs) -> None:
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    _handshake(ctx, *certs["ca"])  # the configured CA: accepted
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ctx, *certs["rogue"])  # any other CA: refused


def test_config_reads_every_security_setting_from_env(secure_cfg, certs):
    assert secure_cfg.bootstrap_servers == SECURE_ENV["TRM_KAFKA_BOOTSTRAP"]
    assert secure_cfg.security_protocol == "SASL_SSL"
    assert secure_cfg.sasl_mechanism == "SCRAM-SHA-512"
    assert (secure_cfg.sasl_username, secure_cfg.sasl_password) == ("trm-svc", "s3cr3t-pw")
    assert secure_cfg.ssl_cafile == str(certs["ca"][0])
    assert secure_cfg.topic("interactions") == "prod.interactions"


def test_kafka_python_publisher_and_admin_get_sasl_ssl(secure_cfg, certs):
    """The publisher's real KafkaProducer (streams.publisher.make_producer) and the admin client."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.net.sasl import get_sasl_mechanism
    from kafka.net.transport import KafkaSSLTransport

    kw = secure_cfg.kafka_python_kwargs()
    assert kw["bootstrap_servers"] == ["b-1.kafka.test:9096", "b-2.kafka.test:9096"]
    # Every key is one the clients accept (an unknown key raises "Unrecognized configs").
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(kw) <= set(client.DEFAULT_CONFIG), (client.__name__, set(kw) - set(client.DEFAULT_CONFIG))

    from streams.publisher import make_producer

    # api_version given: the constructor does not block on bootstrapping an unreachable cluster.
    producer = make_producer(secure_cfg, api_version=(3, 0), max_block_ms=100)
    try:
        conf = producer.config
        assert conf["security_protocol"] == "SASL_SSL"
        assert conf["sasl_mechanism"] == "SCRAM-SHA-512"
        assert conf["sasl_plain_username"] == "trm-svc" and conf["sasl_plain_password"] == "s3cr3t-pw"
        assert conf["ssl_cafile"] == str(certs["ca"][0])
        assert conf["bootstrap_servers"] == kw["bootstrap_servers"]
        # What kafka-python builds at connect time from that config:
        mech = get_sasl_mechanism(conf["sasl_mechanism"])(**conf)
        assert type(mech).__name__ == "SaslMechanismScram" and mech.username == "trm-svc"
        assert mech.auth_bytes().startswith(b"n,,n=trm-svc,r=")  # SCRAM client-first message
        ctx = KafkaSSLTransport._build_ssl_context({**KafkaSSLTransport.DEFAULT_CONFIG,
                                                   **{k: conf[k] for k in KafkaSSLTransport.DEFAULT_CONFIG if k in conf}})
    finally:
        producer.close(timeout=1)
    _assert_trusts_only_ca(ctx, certs)


def test_plain_mechanism_passes_through(monkeypatch, certs):
    monkeypatch.setenv("TRM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TRM_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("TRM_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("TRM_KAFKA_SASL_PASSWORD", "p")
    monkeypatch.setenv("TRM_KAFKA_SSL_CAFILE", str(certs["ca"][0]))
    cfg = KafkaConfig.from_env()
    from kafka.net.sasl import get_sasl_mechanism

    mech = get_sasl_mechanism("PLAIN")(**cfg.kafka_python_kwargs())
    assert mech.auth_bytes().endswith(b"\x00u\x00p")  # [authzid] NUL user NUL password
    assert cfg.aiokafka_kwargs()["sasl_mechanism"] == "PLAIN"
    import faust

    app = faust.App("trm-plain-test", **cfg.faust_kwargs())
    assert app.conf.broker_credentials.mechanism.value == "PLAIN"


def test_aiokafka_trainer_consumer_gets_sasl_ssl(secure_cfg, certs):
    """The trainer's AIOKafkaConsumer, constructed (not started) with the project's kwargs."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    async def build():
        consumer = AIOKafkaConsumer(group_id="trm-trainer", enable_auto_commit=False,
                                    **secure_cfg.aiokafka_kwargs())
        producer = AIOKafkaProducer(**secure_cfg.aiokafka_kwargs())
        return consumer._client, producer.client

    for client in asyncio.run(build()):
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "trm-svc" and client._sasl_plain_password == "s3cr3t-pw"
        assert client._bootstrap_servers == SECURE_ENV["TRM_KAFKA_BOOTSTRAP"]
        _assert_trusts_only_ca(client._ssl_context, certs)


def test_faust_worker_app_gets_sasl_ssl(secure_cfg, certs):
    """faust.App(**cfg.faust_kwargs()) -> app.conf, and what Faust's aiokafka driver derives from it."""
    import faust
    from aiokafka import AIOKafkaConsumer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    app = faust.App("trm-security-test", **secure_cfg.faust_kwargs())
    creds = app.conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.username == "trm-svc" and creds.password == "s3cr3t-pw"
    assert creds.protocol.value == "SASL_SSL"
    assert [(u.host, u.port) for u in app.conf.broker] == [("b-1.kafka.test", 9096), ("b-2.kafka.test", 9096)]
    assert app.conf.broker_session_timeout == secure_cfg.session_timeout_ms / 1000

    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-512"

    async def build():
        return AIOKafkaConsumer(bootstrap_servers="b-1.kafka.test:9096", **auth)._client

    client = asyncio.run(build())
    assert client._sasl_plain_username == "trm-svc"
    _assert_trusts_only_ca(client._ssl_context, certs)


def test_ssl_without_sasl_reaches_every_client(monkeypatch, certs):
    monkeypatch.setenv("TRM_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("TRM_KAFKA_SSL_CAFILE", str(certs["ca"][0]))
    for k in ("TRM_KAFKA_SASL_MECHANISM", "TRM_KAFKA_SASL_USERNAME", "TRM_KAFKA_SASL_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    cfg = KafkaConfig.from_env()
    assert "sasl_mechanism" not in cfg.kafka_python_kwargs()
    assert cfg.kafka_python_kwargs()["security_protocol"] == "SSL"
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    creds = faust.App("trm-ssl-test", **cfg.faust_kwargs()).conf.broker_credentials
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SSL"
    _assert_trusts_only_ca(auth["ssl_context"], certs)
    _assert_trusts_only_ca(cfg.aiokafka_kwargs()["ssl_context"], certs)


# Client constructors and the KafkaConfig method whose settings each must receive.
CLIENTS = {
    "KafkaProducer": "kafka_python_kwargs", "KafkaConsumer": "kafka_python_kwargs",
    "KafkaAdminClient": "kafka_python_kwargs", "AIOKafkaConsumer": "aiokafka_kwargs",
    "AIOKafkaProducer": "aiokafka_kwargs", "AIOKafkaAdminClient": "aiokafka_kwargs", "App": "faust_kwargs",
}


def _kafka_client_calls():
    """(file, line, client, enclosing function source) for each Kafka client the project constructs."""
    for pkg in ("streams", "trainer", "tokenizer", "trm", "bench", "deploy"):
        for path in sorted((REPO_ROOT / pkg).rglob("*.py")):
            src = path.read_text()
            tree = ast.parse(src)
            funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                if name not in CLIENTS:
                    continue
                if name == "App" and "faust" not in src:
                    continue
                scope = min((f for f in funcs if f.lineno <= node.lineno <= f.end_lineno),
                            key=lambda f: f.end_lineno - f.lineno, default=tree)
                yield path.relative_to(REPO_ROOT), node.lineno, name, ast.get_source_segment(src, scope) or src


def test_every_kafka_client_in_the_project_is_built_from_kafka_config():
    calls = list(_kafka_client_calls())
    assert any(c[2] == "KafkaProducer" for c in calls), "the publisher's KafkaProducer was not found"
    missing = [f"{path}:{line} {name}(...) does not use KafkaConfig.{CLIENTS[name]}()"
               for path, line, name, scope in calls if f"{CLIENTS[name]}(" not in scope]
    assert not missing, ("Kafka clients built without the shared security settings:\n" + "\n".join(missing)
                         + "\nPass **config.<method>() from streams.kafka_config.KafkaConfig.")
