"""The MLflow tracking-server recipe (infra/mlflow/start_server.sh) really serves: PostgreSQL backend, proxied S3
artifacts in a bucket it creates, Host and CORS checks from the environment, and a database password holding '@',
':' and '/' that works and is never printed, not even in part."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from infra.core.net import free_port
from tests.services import MLFLOW_ALLOWED_HOST, mlflow_recipe_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra/mlflow/start_server.sh"


def _serve_module():
    spec = importlib.util.spec_from_file_location("varsr_mlflow_serve", ROOT / "infra/mlflow/serve.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _secret_pieces(password: str) -> list[str]:
    """The password, its URL-encodings, and every alphanumeric run of it (what a partial mask would leave)."""
    runs = [r for r in re.split(r"[^A-Za-z0-9]+", password) if r]
    assert all(len(r) >= 8 for r in runs), "fixture password fragments too short to search for"
    return [password, quote(password, safe=""), quote(password), *runs]


def _assert_no_secret(text: str, password: str, where: str) -> None:
    for piece in _secret_pieces(password):
        assert piece not in text, f"{where} contains a piece of the database password"


def _run_recipe(env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------- the running server
def test_run_with_artifact_goes_to_postgres_and_s3_and_reads_back(
    mlflow_server, s3_server, postgres_server, tmp_path, monkeypatch
):
    import mlflow
    from mlflow.tracking import MlflowClient

    # the client holds no object-store credentials: artifacts must travel through the server's proxy
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        exp_id = mlflow.create_experiment(f"recipe-{os.getpid()}-{free_port()}")
        payload = tmp_path / "notes.txt"
        payload.write_text("varsr artifact through the proxy\n")
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_param("stage", "isr")
            mlflow.log_metric("loss", 0.25, step=3)
            mlflow.log_artifact(str(payload), artifact_path="docs")
        run_id = run.info.run_id
        client = MlflowClient(mlflow_server.uri)
        got = client.get_run(run_id)
        assert got.data.params["stage"] == "isr" and got.data.metrics["loss"] == 0.25
        assert got.info.artifact_uri.startswith("mlflow-artifacts:"), got.info.artifact_uri
        back = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="docs/notes.txt", dst_path=str(tmp_path / "back")
        )
        assert Path(back).read_text() == payload.read_text()
    finally:
        mlflow.set_tracking_uri(None)

    # the artifact is an object in the bucket the recipe created, under the configured prefix
    keys = s3_server.list_keys(mlflow_server.bucket, "artifacts/")
    assert any(k.endswith(f"{run_id}/artifacts/docs/notes.txt") for k in keys), keys
    # the run is a row in PostgreSQL, reached with the password that holds '@', ':' and '/'
    assert {"@", ":", "/"} <= set(postgres_server.password)
    with postgres_server.connect(mlflow_server.database) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    assert row == ("FINISHED",)
    assert "(bucket created)" in mlflow_server.log_text()


def test_allowed_host_gets_200_and_other_hosts_403(mlflow_server):
    url = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search"
    ok = requests.get(url, params={"max_results": 1}, headers={"Host": MLFLOW_ALLOWED_HOST}, timeout=30)
    assert ok.status_code == 200 and "experiments" in ok.json()
    refused = requests.get(url, params={"max_results": 1}, headers={"Host": "mlflow.attacker.example:5000"}, timeout=30)
    assert refused.status_code == 403
    # loopback stays allowed beside the listed host (local health checks, port-forwards)
    assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 200


def test_cors_origins_come_from_the_environment(mlflow_server):
    url = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    allowed = requests.post(url, json=body, headers={"Origin": "http://mlflow.internal:5000"}, timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers.get("access-control-allow-origin") == "http://mlflow.internal:5000"
    blocked = requests.post(url, json=body, headers={"Origin": "http://evil.example"}, timeout=30)
    assert blocked.status_code == 403


def test_server_output_never_contains_the_password(mlflow_server, postgres_server):
    text = mlflow_server.log_text()
    assert "backend=postgresql+psycopg://varsr:***@127.0.0.1:" in text  # the banner, masked
    _assert_no_secret(text, postgres_server.password, "the MLflow server log")


# ------------------------------------------------------------------------------------ failing starts: one line
def test_wrong_password_fails_in_one_line_without_printing_it(s3_server, postgres_server, tmp_path):
    env = mlflow_recipe_env(s3_server, postgres_server, postgres_server.dbname, free_port(), "unused-bucket")
    wrong = postgres_server.password[::-1]  # same characters, so the same fragments would show if printed
    env.update({"MLFLOW_DB_PASSWORD": wrong, "MLFLOW_STARTUP_WAIT_S": "0"})
    res = _run_recipe(env, tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert out.strip().count("\n") == 0, out
    assert "cannot connect to the backend store postgresql+psycopg://***@" in out  # user and password masked
    assert "password authentication failed" in out
    _assert_no_secret(out, wrong, "the recipe's output")
    _assert_no_secret(out, postgres_server.password, "the recipe's output")


def test_endpoint_down_fails_in_one_line_naming_the_bucket(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(s3_server.env)
    env.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "PYTHON": sys.executable,
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://varsr-down/artifacts",
            "MLFLOW_STARTUP_WAIT_S": "0",
        }
    )
    res = _run_recipe(env, tmp_path)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2 and "\n" not in out, out
    assert "s3://varsr-down" in out and "is down or unreachable" in out and "Traceback" not in out


def test_refused_credentials_fail_in_one_line(s3_server_strict, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(s3_server_strict.env)
    env.update(
        {
            "PYTHON": sys.executable,
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://varsr-refused/artifacts",
            "MLFLOW_STARTUP_WAIT_S": "0",
        }
    )
    res = _run_recipe(env, tmp_path)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2 and "\n" not in out, out
    assert "S3 refused the credentials for s3://varsr-refused" in out
    assert s3_server_strict.secret_access_key not in out


# ------------------------------------------------------------------------------------ the launcher's pieces
def test_password_is_url_encoded_and_round_trips():
    from sqlalchemy.engine import make_url

    serve = _serve_module()
    password = "p@ss:w/rd%?#x"
    b = serve.backend_from_env(
        {
            "MLFLOW_DB_HOST": "db.internal",
            "MLFLOW_DB_USER": "ml@user",
            "MLFLOW_DB_PASSWORD": password,
            "MLFLOW_DB_NAME": "mlflow",
        },
        "/tmp",
    )
    url = make_url(b.uri)
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "ml@user",
        password,
        "db.internal",
        5432,
        "mlflow",
    )
    assert b.shown == "postgresql+psycopg://ml%40user:***@db.internal:5432/mlflow"


def test_raw_uri_is_masked_whole_and_pointed_at_psycopg():
    serve = _serve_module()
    raw = "postgresql://mlflow:abc@def:ghi/jkl@db.internal:5432/mlflow"  # a raw password with '@', ':' and '/'
    b = serve.backend_from_env({"MLFLOW_BACKEND_STORE_URI": raw}, "/tmp")
    assert b.uri.startswith("postgresql+psycopg://")
    assert b.shown == "postgresql+psycopg://***@db.internal:5432/mlflow"
    for piece in ("abc", "def", "ghi", "jkl"):
        assert piece not in b.shown


def test_defaults_bind_loopback_and_keep_mlflow_host_defaults():
    serve = _serve_module()
    cmd = serve.build_command({}, "/tmp/mlartifacts")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--allowed-hosts" not in cmd and "--cors-allowed-origins" not in cmd
    assert "--backend-store-uri" not in cmd  # the URI (with its password) travels in the environment
    listed = serve.allowed_hosts({"MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow.internal:5000, mlflow.internal"})
    assert listed.split(",")[:2] == ["mlflow.internal:5000", "mlflow.internal"] and "127.0.0.1:*" in listed


def test_both_backend_forms_at_once_is_an_error():
    serve = _serve_module()
    with pytest.raises(serve.SetupError, match="not both"):
        serve.backend_from_env(
            {"MLFLOW_DB_HOST": "h", "MLFLOW_DB_PASSWORD": "x", "MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "/tmp"
        )


def test_docker_compose_drives_the_same_recipe():
    """docker-compose.yaml runs start_server.sh with settings the script documents, the password as its own
    variable (never pasted into a URI), and loopback-only ports."""
    import yaml

    compose = yaml.safe_load((ROOT / "infra/mlflow/docker-compose.yaml").read_text())
    svc = compose["services"]["mlflow"]
    assert svc["command"] == ["bash", "infra/mlflow/start_server.sh"]
    documented = set(re.findall(r"\b((?:MLFLOW|AWS)_[A-Z0-9_]+)\b", SCRIPT.read_text()))
    env = svc["environment"]
    assert set(env) - {"MLFLOW_DISABLE_TELEMETRY"} <= documented, set(env) - documented
    assert "MLFLOW_BACKEND_STORE_URI" not in env and env["MLFLOW_DB_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert env["MLFLOW_DB_HOST"] == "postgres" and "MLFLOW_SERVER_ALLOWED_HOSTS" in env
    for name, s in compose["services"].items():
        assert all(str(p).startswith("127.0.0.1:") for p in s.get("ports", [])), name
