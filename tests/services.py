"""Native Redis and PostgreSQL for tests: the production stores without a Docker engine.

Plain functions (`start_redis()`, `start_postgres()`) return handles with `.stop()`; the pytest
fixtures below wrap them (session-scoped: one Redis and one Postgres cluster per test run).
Use them from a test module or conftest.py with

    from services import redis_server, postgres_server, feast_prod_env  # noqa: F401 (fixtures)

Both servers listen on 127.0.0.1 on a free port, keep their data in a throwaway directory and
are stopped by PID at teardown. The binaries come from Debian: `make system-deps` installs them.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "run `make system-deps` (as root it apt-installs redis-server and postgresql)"


class ServiceError(RuntimeError):
    """A native service could not be found or started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------- Redis
@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    dir: Path
    host: str = "127.0.0.1"
    persistent: bool = False

    @property
    def connection_string(self) -> str:
        """Feast's Redis `connection_string` format."""
        return f"{self.host}:{self.port}"

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data dir stays (see `start_redis(persistent=True)`)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise ServiceError(f"redis-server not found on PATH: {INSTALL_HINT}")
    return path


def _launch_redis(binary: str, port: int, workdir: Path, persistent: bool, timeout: float) -> RedisServer | None:
    """redis-server in the foreground on `port` (we own its PID); None if it did not answer PING."""
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    log = open(workdir / "redis.log", "ab")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability,
         "--daemonize", "no", "--dir", str(workdir)],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = RedisServer(port=port, proc=proc, dir=workdir, persistent=persistent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if server.ping():
            return server
        time.sleep(0.05)
    _terminate(proc)
    return None


def start_redis(timeout: float = 15.0, persistent: bool = False) -> RedisServer:
    """A Redis on a free loopback port with no persistence — or, `persistent`, an append-only file
    fsynced on every write (as production runs it), so `kill()` then `restart_redis()` keeps the data."""
    binary = redis_binary()
    last_log = ""
    for _attempt in range(3):  # a free port can be taken between probe and bind
        workdir = Path(tempfile.mkdtemp(prefix="trm-redis-"))
        server = _launch_redis(binary, free_port(), workdir, persistent, timeout)
        if server is not None:
            return server
        last_log = (workdir / "redis.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(workdir, ignore_errors=True)
    raise ServiceError(f"redis-server did not become ready on 127.0.0.1; its log:\n{last_log}")


def restart_redis(server: RedisServer, timeout: float = 15.0) -> RedisServer:
    """Start `server` again on its port and data dir (after `kill()`)."""
    again = _launch_redis(redis_binary(), server.port, server.dir, server.persistent, timeout)
    if again is None:
        raise ServiceError(f"redis-server did not restart on 127.0.0.1:{server.port}; its log:\n"
                           + (server.dir / "redis.log").read_text(errors="replace")[-2000:])
    return again


# ---------------------------------------------------------------------------------- PostgreSQL
@dataclass
class PostgresServer:
    port: int
    pid: int
    root: Path  # data dir, socket dir and log live under here
    bindir: Path
    dbname: str
    user: str = "postgres"
    host: str = "127.0.0.1"
    _run_as: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """SQLAlchemy URL with the psycopg 3 driver (what Feast's SQL registry takes)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def psql(self, sql: str, db: str | None = None) -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-h", self.host, "-p", str(self.port), "-U", self.user,
             "-d", db or self.dbname, "-Atc", sql],
            capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGINT)  # postgres "fast" shutdown: disconnect clients, exit
        except ProcessLookupError:
            pass
        if not _wait_pid_gone(self.pid, 30):
            os.kill(self.pid, signal.SIGQUIT)  # "immediate" shutdown
            _wait_pid_gone(self.pid, 10)
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_bindir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin (Debian layout), or $TRM_PG_BINDIR."""
    env = os.environ.get("TRM_PG_BINDIR")
    candidates = [Path(env)] if env else sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for bindir in reversed(candidates):
        if all((bindir / b).exists() for b in ("initdb", "pg_ctl", "psql")):
            return bindir
    raise ServiceError(f"PostgreSQL server binaries (initdb, pg_ctl) not found under "
                       f"/usr/lib/postgresql/*/bin: {INSTALL_HINT}")


def _run_as_prefix() -> list[str]:
    """initdb/postgres refuse to run as root: as root, run them as the `postgres` system user."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(f"running as root but there is no `postgres` user to own the cluster: {INSTALL_HINT}")
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]


def _run(prefix: list[str], argv: list[str], **kw) -> subprocess.CompletedProcess:
    if prefix and prefix[0] == "su":  # `su -c` takes one shell string
        import shlex

        argv = [shlex.join(argv)]
    return subprocess.run(prefix + argv, capture_output=True, text=True, **kw)


def start_postgres(dbname: str = "feast_registry", timeout: float = 60.0) -> PostgresServer:
    """A throwaway cluster: initdb into a temp dir, start on a free loopback port, create `dbname`.

    Trust auth on loopback only; the cluster is deleted at stop().
    """
    bindir = postgres_bindir()
    prefix = _run_as_prefix()
    # As root the cluster belongs to `postgres`, who must reach it: /tmp, not a private $TMPDIR.
    # Short path too: the Unix socket lives here (sun_path is ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="trm-pg-", dir="/tmp" if prefix else None))
    if prefix:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, log = root / "data", root / "postgres.log"
    init = _run(prefix, [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                         "-E", "UTF8", "--no-sync"])
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise ServiceError(f"initdb failed (rc {init.returncode}):\n{init.stdout}\n{init.stderr}")
    last = ""
    for _attempt in range(3):  # port race, as for Redis
        port = free_port()
        opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off")
        start = _run(prefix, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                              "-t", str(int(timeout)), "-o", opts, "start"])
        if start.returncode == 0:
            pid = int((data / "postmaster.pid").read_text().split()[0])
            server = PostgresServer(port=port, pid=pid, root=root, bindir=bindir, dbname=dbname,
                                    _run_as=prefix)
            try:
                server.psql(f'CREATE DATABASE "{dbname}"', db="postgres")
            except subprocess.CalledProcessError as exc:
                server.stop()
                raise ServiceError(f"creating database {dbname} failed: {exc.stderr}") from exc
            return server
        last = f"{start.stdout}\n{start.stderr}\n" + (log.read_text(errors="replace")[-2000:] if log.exists() else "")
    shutil.rmtree(root, ignore_errors=True)
    raise ServiceError(f"PostgreSQL did not start on 127.0.0.1:\n{last}")


# ------------------------------------------------------------------------------------ fixtures
def _start_or_fail(starter, **kw):
    try:
        return starter(**kw)
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_server():
    """A running RedisServer (host, port, connection_string); flush it yourself if you need it empty."""
    server = _start_or_fail(start_redis)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgresServer (host, port, url, psql()) with an empty database `feast_registry`."""
    server = _start_or_fail(start_postgres)
    yield server
    server.stop()


@pytest.fixture
def feast_prod_env(redis_server, postgres_server, monkeypatch):
    """The environment deploy/feature_repo_prod/feature_store.yaml reads, pointed at the native
    services. Each test gets a fresh registry database and an empty Redis, so one test's
    `feast apply` or rows never leak into another's."""
    db = f"reg_{os.getpid()}_{time.monotonic_ns()}"
    postgres_server.psql(f'CREATE DATABASE "{db}"', db="postgres")
    env = {
        "REDIS_HOST": redis_server.host, "REDIS_PORT": str(redis_server.port), "REDIS_OPTIONS": "",
        "FEAST_REGISTRY_USER": postgres_server.user, "FEAST_REGISTRY_PASSWORD": "",
        "FEAST_REGISTRY_HOST": postgres_server.host, "FEAST_REGISTRY_PORT": str(postgres_server.port),
        "FEAST_REGISTRY_DB": db,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _flush_redis(redis_server)
    return env


def _flush_redis(server: RedisServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"FLUSHALL\r\n")
        if not s.recv(64).startswith(b"+OK"):
            raise ServiceError("FLUSHALL failed on the test Redis")


# ------------------------------------------------------------------------------- S3 (moto)
@dataclass
class S3Server:
    """moto's S3 server on a loopback port: the object store behind a durable (s3://) Tansu."""
    port: int
    proc: subprocess.Popen
    bucket: str = "tansu"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tansu_env(self) -> dict:
        """What Tansu's S3 storage reads (object_store crate): endpoint, plain HTTP, credentials."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def stop(self) -> None:
        _terminate(self.proc)


def start_s3(bucket: str = "tansu", timeout: float = 30.0) -> S3Server:
    """`python -m moto.server` on a free port with one empty bucket (moto is a test extra)."""
    import sys
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = S3Server(port=port, proc=proc, bucket=bucket)
    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(f"{server.endpoint}/{bucket}", method="PUT")
            urllib.request.urlopen(req, timeout=2).close()
            return server
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise ServiceError(f"moto S3 server did not start on 127.0.0.1:{port}: `pip install -e '.[test]'`")
            time.sleep(0.2)
