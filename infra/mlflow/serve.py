"""Start the MLflow tracking server from environment settings (run by infra/mlflow/start_server.sh).

Before handing over to ``mlflow server`` it checks what would otherwise fail late and noisily, and ends with ONE line
on stderr (exit 2) when something is wrong:

- the backend store URI is built from parts (``MLFLOW_DB_*``) with user and password percent-encoded, so a password
  holding ``@``, ``:`` or ``/`` works; a ``postgresql://`` URI is pointed at the psycopg 3 driver (the one the
  ``cluster`` extra installs); the URI travels to the server in its environment, never on a command line, and is
  only ever printed through the platform's one redaction function (infra/core/redact.py: user-info, a libpq
  ``?password=`` and other secret query values replaced by ``***``);
- the database driver (psycopg) and, for ``s3://`` artifacts, boto3 are importable;
- the database answers (retried for ``MLFLOW_STARTUP_WAIT_S`` seconds while it starts up);
- the artifact bucket exists, and is created when missing (before the first upload, which would otherwise get a
  500 and retry for minutes); an endpoint that is down or credentials that are refused end in one line naming the
  bucket and the endpoint;
- the allowed Host headers and CORS origins come from ``MLFLOW_SERVER_ALLOWED_HOSTS`` and
  ``MLFLOW_SERVER_CORS_ALLOWED_ORIGINS``; loopback stays allowed beside the listed hosts so that local health
  checks and port-forwards keep working.

Stand-alone on purpose (standard library, plus psycopg/boto3 when used): it runs in the image or any venv that has
MLflow, and imports nothing from the project's packages; it loads ``infra/core/redact.py`` (standard library only) by
its path beside this file.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlsplit


def _load_redact():
    """infra/core/redact.py, loaded by path: this script runs as a file, with no package on its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "core", "redact.py")
    spec = importlib.util.spec_from_file_location("varsr_redact", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_redact = _load_redact()
redact = _redact.redact

LOOPBACK_HOSTS = ("localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[[]::1]:*")


class SetupError(Exception):
    """A one-line, user-facing reason the server cannot start."""


@dataclass(frozen=True)
class Backend:
    uri: str  # what MLflow gets (contains the secret)
    shown: str  # what may be printed (credentials masked)
    secrets: tuple[str, ...] = ()  # strings that must never be printed (raw and encoded password)


def mask_credentials(uri: str) -> str:
    """`scheme://***@host/...?password=***`: the platform's redaction (infra/core/redact.py). Everything between
    '://' and the LAST '@' of the authority is credentials, so a raw password that itself contains '@', ':' or '/' is
    hidden whole, never in part; secret query values (libpq's `password`, `sslpassword`, ...) are masked too."""
    return redact(uri)


def _psycopg_scheme(uri: str) -> str:
    """postgresql:// and postgres:// would make SQLAlchemy look for psycopg2; the project ships psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if uri.startswith(prefix):
            return "postgresql+psycopg://" + uri[len(prefix) :]
    return uri


def backend_from_env(env: dict[str, str], cwd: str) -> Backend:
    host, raw = env.get("MLFLOW_DB_HOST", ""), env.get("MLFLOW_BACKEND_STORE_URI", "")
    if host and raw:
        raise SetupError(
            "set either MLFLOW_DB_HOST (with MLFLOW_DB_USER/MLFLOW_DB_PASSWORD/MLFLOW_DB_NAME) or "
            "MLFLOW_BACKEND_STORE_URI, not both"
        )
    if host:
        password = env.get("MLFLOW_DB_PASSWORD", "")
        if not password and env.get("MLFLOW_DB_PASSWORD_FILE"):
            try:
                with open(env["MLFLOW_DB_PASSWORD_FILE"]) as f:
                    password = f.read().rstrip("\r\n")
            except OSError as e:
                raise SetupError(f"cannot read MLFLOW_DB_PASSWORD_FILE: {e.strerror}") from None
        if not password:
            raise SetupError("MLFLOW_DB_HOST is set but MLFLOW_DB_PASSWORD (or MLFLOW_DB_PASSWORD_FILE) is empty")
        user = env.get("MLFLOW_DB_USER", "mlflow")
        name = env.get("MLFLOW_DB_NAME", "mlflow")
        port = env.get("MLFLOW_DB_PORT", "5432")
        netloc_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        tail = f"@{netloc_host}:{port}/{quote(name, safe='')}"
        uri = f"postgresql+psycopg://{quote(user, safe='')}:{quote(password, safe='')}{tail}"
        return Backend(
            uri,
            f"postgresql+psycopg://{quote(user, safe='')}:***{tail}",
            (password, quote(password, safe=""), quote(password)),
        )
    if raw:
        uri = _psycopg_scheme(raw)
        creds = raw.partition("://")[2].rpartition("@")[0]
        password = creds.partition(":")[2]
        in_query = [v for k, v in parse_qsl(urlsplit(raw).query) if _redact.secret_key(k, query=True)]
        return Backend(uri, mask_credentials(uri), tuple(s for s in (password, creds, *in_query) if s))
    return Backend(f"sqlite:///{os.path.join(cwd, 'mlflow.db')}", f"sqlite:///{os.path.join(cwd, 'mlflow.db')}")


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """First line of `text` with every secret (longest first) replaced by ***, then redacted as any URI is."""
    line = (text.strip().splitlines() or [""])[0]
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            line = line.replace(s, "***")
    return redact(line)


def check_backend(backend: Backend, wait_s: float) -> None:
    """Driver importable and database reachable (retried until `wait_s` has passed: a database that is still
    starting, as under docker compose, is not an error)."""
    if not backend.uri.startswith("postgresql"):
        return
    try:
        import psycopg
    except ImportError:
        raise SetupError("the PostgreSQL backend needs psycopg: pip install 'varsr-platform[cluster]'") from None
    libpq_uri = "postgresql://" + backend.uri.partition("://")[2]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            psycopg.connect(libpq_uri, connect_timeout=5).close()
            return
        except psycopg.Error as e:
            if time.monotonic() >= deadline:
                raise SetupError(
                    f"cannot connect to the backend store {backend.shown}: {scrub(str(e), backend.secrets)}"
                ) from None
            time.sleep(1.0)


def s3_endpoint(env: dict[str, str]) -> str | None:
    return env.get("MLFLOW_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def ensure_bucket(destination: str, env: dict[str, str], wait_s: float) -> str:
    """Create the bucket of an s3:// artifact destination when it does not exist. Returns 'exists' or 'created'."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
    except ImportError:
        raise SetupError("s3:// artifacts need boto3: pip install 'varsr-platform[cluster]'") from None
    bucket = urlsplit(destination).netloc
    endpoint = s3_endpoint(env)
    where = f"s3://{bucket} at {endpoint or 'the AWS default endpoint'}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 2})
    )
    deadline = time.monotonic() + wait_s
    while True:
        try:
            try:
                client.head_bucket(Bucket=bucket)
                return "exists"
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
                    region = client.meta.region_name
                    kwargs = {"Bucket": bucket}
                    if region and region != "us-east-1":
                        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
                    client.create_bucket(**kwargs)
                    return "created"
                raise
        except NoCredentialsError:
            raise SetupError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a role)"
            ) from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "") or "error"
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (401, 403) or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise SetupError(f"S3 refused the credentials for {where} ({code})") from None
            raise SetupError(f"S3 error for {where}: {code}") from None
        except (EndpointConnectionError, BotoCoreError) as e:
            if time.monotonic() >= deadline:
                kind = "is down or unreachable" if isinstance(e, EndpointConnectionError) else f"failed: {e}"
                raise SetupError(f"the S3 endpoint for {where} {kind}") from None
            time.sleep(1.0)


def allowed_hosts(env: dict[str, str]) -> str | None:
    """The listed hosts plus loopback (MLflow replaces its defaults with the list), or None for MLflow's defaults
    (localhost and private addresses)."""
    listed = [h.strip() for h in env.get("MLFLOW_SERVER_ALLOWED_HOSTS", "").split(",") if h.strip()]
    if not listed:
        return None
    if "*" in listed:
        return "*"
    return ",".join(dict.fromkeys([*listed, *LOOPBACK_HOSTS]))


def build_command(env: dict[str, str], destination: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--artifacts-destination",
        destination,
        "--serve-artifacts",
        "--host",
        env.get("MLFLOW_HOST", "127.0.0.1"),
        "--port",
        env.get("MLFLOW_PORT", "5000"),
        "--workers",
        env.get("MLFLOW_WORKERS", "2"),
    ]
    hosts = allowed_hosts(env)
    if hosts:
        cmd += ["--allowed-hosts", hosts]
    origins = env.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS", "").strip()
    if origins:
        cmd += ["--cors-allowed-origins", origins]
    return cmd


def main() -> int:
    # an empty endpoint variable (docker compose's `${AWS_ENDPOINT_URL:-}`) means "the AWS default", not "no URL"
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        if not os.environ.get(k, "x").strip():
            del os.environ[k]  # boto3 reads the process environment
    env = dict(os.environ)
    cwd = os.getcwd()
    wait_s = float(env.get("MLFLOW_STARTUP_WAIT_S", "30"))
    destination = env.get("MLFLOW_ARTIFACTS_DESTINATION", os.path.join(cwd, "mlartifacts"))
    try:
        backend = backend_from_env(env, cwd)
        check_backend(backend, wait_s)
        bucket_state = ""
        if destination.startswith("s3://"):
            bucket_state = f" (bucket {ensure_bucket(destination, env, wait_s)})"
            if s3_endpoint(env):
                env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint(env)  # the variable MLflow's S3 store reads
    except SetupError as e:
        print(f"error: mlflow server: {redact(str(e))}", file=sys.stderr, flush=True)
        return 2
    cmd = build_command(env, destination)
    hosts = allowed_hosts(env) or "MLflow defaults (localhost, private addresses)"
    print(
        f"mlflow server: backend={backend.shown} artifacts={redact(destination)}{bucket_state} "
        f"on {env.get('MLFLOW_HOST', '127.0.0.1')}:{env.get('MLFLOW_PORT', '5000')} allowed-hosts={hosts}",
        file=sys.stderr,
        flush=True,
    )
    for k in ("MLFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD_FILE"):
        env.pop(k, None)  # the server needs only the URI
    env["MLFLOW_BACKEND_STORE_URI"] = backend.uri  # read by `mlflow server` (click envvar): never on the argv
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
