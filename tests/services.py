"""Real services on 127.0.0.1 for the test suite, started once per session and torn down at the end.

- ``s3_server``: moto's standalone S3 server (``python -m moto.server``), the endpoint s3fs's own tests use.
  ``s3_env`` points one test's environment at it (AWS_ENDPOINT_URL and credentials); ``s3_bucket`` makes a fresh
  bucket for one test. ``s3_server_strict`` is a second moto server that refuses every credential (IAM checks on,
  no users), for the "credentials refused" paths.
- ``postgres_server``: a throwaway PostgreSQL cluster (initdb + pg_ctl, as the ``postgres`` user when running as
  root) on a free port, with a login role whose password contains ``@``, ``:`` and ``/``.
- ``mlflow_server``: an MLflow tracking server started through the project's own recipe,
  ``infra/mlflow/start_server.sh``: PostgreSQL backend store, proxied artifacts (``mlflow-artifacts:``) in a bucket on
  the moto server that the recipe itself creates, and ``mlflow.internal:5000`` among the allowed Host headers.

Nothing here skips: a missing binary fails the fixture with the install step to run. Every server's output goes to a
log file (``.log_path``), which the tests read to check that no secret was printed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from infra.core.net import free_port

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# the Host header that configs/train/d24_isr_cluster.yaml's tracking URI sends; the session's MLflow server allows it
MLFLOW_ALLOWED_HOST = "mlflow.internal:5000"
_AWS_CONFLICTING = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
)


# ---------------------------------------------------------------------------------------------------- processes
def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_http(
    url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, what: str, headers: dict | None = None
) -> None:
    """Poll `url` until it answers 200; fail with the log tail if the process exits or time runs out."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"{what} exited with code {proc.returncode} before it was ready; log {log_path}:\n{_tail(log_path)}",
                pytrace=False,
            )
        try:
            if requests.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} not ready after {timeout_s:.0f} s; log {log_path}:\n{_tail(log_path)}", pytrace=False)


def _stop(proc: subprocess.Popen, name: str, timeout_s: float = 20) -> None:
    """SIGTERM the process group (the servers fork workers), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    t0 = time.monotonic()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout_s)
    print(f"[services] {name} stopped in {time.monotonic() - t0:.1f} s", file=sys.stderr)


def _timed(name: str, started: float) -> None:
    # `pytest -s` shows how long each service took to start (also in the junit/captured output otherwise)
    print(f"[services] {name} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------- S3
@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible endpoint (moto) and the credentials it was given."""

    endpoint_url: str
    log_path: Path
    access_key_id: str = "varsr-test-key"
    secret_access_key: str = "varsr-test-secret"
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """The environment that boto3, s3fs and MLflow read to reach this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments for this endpoint (when not going through the environment)."""
        return {
            "key": self.access_key_id,
            "secret": self.secret_access_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def client(self):
        """A boto3 S3 client for this endpoint (independent of the process environment)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when `name` is None) and return its name."""
        name = name or f"varsr-test-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in `bucket` (paginated)."""
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


def _start_moto(log_dir: Path, name: str, extra_env: dict[str, str] | None = None):
    port = free_port()
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, **(extra_env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = S3Server(endpoint_url=f"http://{LOOPBACK}:{port}", log_path=log_path)
    return proc, server


def _moto_session(tmp_path_factory, folder: str, name: str, label: str, env: dict | None = None):
    """Start moto's S3 server, wait until it answers, yield it, stop it (the body of the S3 fixtures)."""
    t0 = time.monotonic()
    proc, server = _start_moto(tmp_path_factory.mktemp(folder), name, env)
    try:
        _wait_http(f"{server.endpoint_url}/moto-api/", proc, server.log_path, 60, label)
        _timed(label, t0)
        yield server
    finally:
        _stop(proc, label)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port for the whole session (any credentials accepted)."""
    yield from _moto_session(tmp_path_factory, "moto", "moto-s3", "moto S3 server")


@pytest.fixture(scope="session")
def s3_server_strict(tmp_path_factory):
    """A second moto S3 server with IAM checks on and no users: every request is refused (InvalidAccessKeyId)."""
    yield from _moto_session(
        tmp_path_factory,
        "moto_strict",
        "moto-s3-strict",
        "strict moto S3 server",
        {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
    )


def _clear_s3fs_cache() -> None:
    # s3fs caches filesystem instances by constructor arguments, not by environment: a cached instance would keep
    # talking to the endpoint of an earlier test
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """Point this test's environment (boto3, s3fs, MLflow, subprocesses) at the session's moto server."""
    for k in _AWS_CONFLICTING:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    _clear_s3fs_cache()
    yield s3_server
    _clear_s3fs_cache()


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the session's moto server (environment already pointed at it)."""
    return s3_env.create_bucket()


# --------------------------------------------------------------------------------------------------- PostgreSQL
PG_INSTALL_HINT = (
    "install Debian's PostgreSQL server: `apt-get install -y postgresql` "
    "(infra/scripts/test.sh runs infra/scripts/ensure_postgres.sh, which does this)"
)


def pg_bindir() -> Path:
    """Folder holding initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    raise FileNotFoundError(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {PG_INSTALL_HINT}")


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server with one login role (`user`/`password`) that owns database `dbname`."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    socket_dir: Path
    log_path: Path
    superuser: str = "postgres"

    def url(self, dbname: str | None = None, driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy/libpq URL with user and password percent-encoded (the password holds '@', ':' and '/')."""
        return (
            f"{driver}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{dbname or self.dbname}"
        )

    def connect(self, dbname: str | None = None, superuser: bool = False):
        """psycopg connection: as the login role over TCP (password auth), or as the superuser over the socket."""
        import psycopg

        if superuser:
            return psycopg.connect(
                host=str(self.socket_dir),
                port=self.port,
                user=self.superuser,
                dbname=dbname or "postgres",
                autocommit=True,
            )
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname or self.dbname,
            autocommit=True,
        )

    def create_database(self, name: str | None = None) -> str:
        """A new database owned by the login role (a unique name when `name` is None)."""
        from psycopg import sql

        name = name or f"varsr_{secrets.token_hex(4)}"
        with self.connect(superuser=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(self.user)))
        return name


def _pg_user_kwargs() -> dict:
    """Run the server as `postgres` when we are root (PostgreSQL refuses to run as root), else as ourselves."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(
            f"running as root but there is no `postgres` user to run the server as: {PG_INSTALL_HINT}", pytrace=False
        )
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on a free loopback port: role `varsr` (password with '@', ':', '/') owning
    database `varsr`. TCP logins need the password (scram-sha-256); the superuser connects over the private socket."""
    try:
        bindir = pg_bindir()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    t0 = time.monotonic()
    as_user = _pg_user_kwargs()
    base = Path(tempfile.mkdtemp(prefix="varsr-pg-"))  # not under pytest's root-only tmp: postgres must enter it
    if as_user:
        os.chown(base, as_user["user"], as_user["group"])
    data, log_path, port = base / "data", base / "postgres.log", free_port()
    password = (
        "@".join(f"pw{secrets.token_hex(5)}" for _ in range(2)) + f":pw{secrets.token_hex(5)}/pw{secrets.token_hex(5)}"
    )

    def run(*cmd: str) -> None:
        res = subprocess.run([str(bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True, cwd=base, **as_user)
        if res.returncode:
            pytest.fail(f"{' '.join(cmd[:1])} failed ({res.returncode}): {res.stdout}{res.stderr}", pytrace=False)

    run(
        "initdb",
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E",
        "UTF8",
        "--no-locale",
        "--no-sync",
    )
    opts = (
        f"-h {LOOPBACK} -p {port} -k {base} -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        f"-c max_connections=60"
    )
    run("pg_ctl", "-D", str(data), "-l", str(log_path), "-w", "-t", "60", "-o", opts, "start")
    server = PostgresServer(
        host=LOOPBACK, port=port, user="varsr", password=password, dbname="varsr", socket_dir=base, log_path=log_path
    )
    try:
        from psycopg import sql

        with server.connect(superuser=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(server.user), sql.Literal(password))
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(server.dbname), sql.Identifier(server.user)
                )
            )
        _timed("PostgreSQL", t0)
        yield server
    finally:
        t1 = time.monotonic()
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            cwd=base,
            **as_user,
        )
        shutil.rmtree(base, ignore_errors=True)
        print(f"[services] PostgreSQL stopped in {time.monotonic() - t1:.1f} s", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------- MLflow
@dataclass(frozen=True)
class MLflowServer:
    """A running MLflow tracking server started by infra/mlflow/start_server.sh."""

    uri: str
    port: int
    log_path: Path
    artifacts_destination: str  # s3://bucket/prefix on the moto server
    bucket: str
    database: str  # PostgreSQL database holding the tracking and registry tables
    allowed_host: str = MLFLOW_ALLOWED_HOST

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the tracking URI (artifacts go through the server's proxy, no S3 credentials)."""
        return {"MLFLOW_TRACKING_URI": self.uri}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def mlflow_recipe_env(s3: S3Server, pg: PostgresServer, database: str, port: int, bucket: str) -> dict[str, str]:
    """The environment the recipe script reads (see infra/mlflow/start_server.sh): the database as parts, the
    artifacts in `bucket` on the S3 endpoint, loopback binding, one worker, `mlflow.internal:5000` allowed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(s3.env)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHON": sys.executable,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_DB_HOST": pg.host,
            "MLFLOW_DB_PORT": str(pg.port),
            "MLFLOW_DB_NAME": database,
            "MLFLOW_DB_USER": pg.user,
            "MLFLOW_DB_PASSWORD": pg.password,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
            "MLFLOW_HOST": LOOPBACK,
            "MLFLOW_PORT": str(port),
            "MLFLOW_WORKERS": "1",
            "MLFLOW_SERVER_ALLOWED_HOSTS": MLFLOW_ALLOWED_HOST,
            "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "http://mlflow.internal:5000",
            "MLFLOW_STARTUP_WAIT_S": "5",
        }
    )
    return env


@pytest.fixture(scope="session")
def mlflow_server(s3_server, postgres_server, tmp_path_factory):
    """MLflow tracking server via infra/mlflow/start_server.sh: PostgreSQL backend, S3 (moto) proxied artifacts in a
    bucket the recipe creates, Host `mlflow.internal:5000` allowed. Yields an `MLflowServer` (`.uri`)."""
    t0 = time.monotonic()
    database = postgres_server.create_database("mlflow")
    bucket = f"mlflow-artifacts-{secrets.token_hex(3)}"  # does not exist yet: the recipe must create it
    port = free_port()
    log_dir = tmp_path_factory.mktemp("mlflow_server")
    log_path = log_dir / "server.log"
    env = mlflow_recipe_env(s3_server, postgres_server, database, port, bucket)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "infra/mlflow/start_server.sh")],
            cwd=log_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MLflowServer(
        uri=f"http://{LOOPBACK}:{port}",
        port=port,
        log_path=log_path,
        artifacts_destination=env["MLFLOW_ARTIFACTS_DESTINATION"],
        bucket=bucket,
        database=database,
    )
    try:
        # /health is exempt from the Host check; the experiments API is not, so this also proves loopback is allowed
        _wait_http(
            f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
            proc,
            log_path,
            240,
            "MLflow tracking server (infra/mlflow/start_server.sh)",
        )
        _timed("MLflow tracking server (PostgreSQL + S3)", t0)
        yield server
    finally:
        _stop(proc, "MLflow tracking server")
