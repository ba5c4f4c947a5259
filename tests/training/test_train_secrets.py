"""No credential of a tracking URI reaches what a run prints, writes or logs (issue 28, finding 15).

A real ``mlflow server`` on 127.0.0.1 (SQLite store, proxied local artifacts) without auth ignores the basic-auth
user-info of ``http://user:password@127.0.0.1:PORT``, so a run given such a URI really trains, tracks and registers
through it. ``varsr train isr`` runs with the URI as ``--set tracking.tracking_uri=http://varsr:<secret>@...`` and
``register.name`` set, which reaches every place the issue found it: the start line, the summary, ``summary.json``
(output and artifact), ``config.yaml``, ``final/train_config.yaml`` (the export and the logged model), the
``resolved_config.json`` artifact, params and tags, MLflow's own "View run" line, and the registration's log line.
A second URI with another password sits in ``$MLFLOW_TRACKING_URI`` meanwhile: it is not used, so it must appear
nowhere at all. Then the run is registered again the way a run tracked through ``$MLFLOW_TRACKING_URI`` is: from its
``summary.json``, which names the store without the password, so the registry must find the full URI in the
environment.

Every file of the output folder, of the server's artifact folder and of its database, the command's stdout and stderr,
the registration's log and the server's log are searched for the planted secrets (raw and URL-encoded). The run and
both registrations must have succeeded through the server, so the URI was used as given.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from infra.core.net import free_port
from tests.services import _stop, _wait_http

TRAIN = [
    "data.batch_size=4",
    "data.workers=0",
    "max_steps=2",
    "optim.lr=2e-3",
    "validation.num_images=1",
    "validation.batches=1",
    "validation.top_k=5",
    "checkpoint_every=0",
    "log_every=1",
    "model.preset=tiny",
    "tracking.system_metrics=false",
    "tracking.experiment=secrets-test",
]


@pytest.fixture
def loopback_mlflow(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a SQLite store and its artifacts in a local folder; yields (port, folder,
    log path)."""
    root = tmp_path / "server"
    root.mkdir()
    port, log = free_port(), root / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, 180, "mlflow server")
        yield port, root, log
    finally:
        _stop(proc, "mlflow server (secrets test)")


def _varsr(args: list[str], cwd: Path, env_uri: str | None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    if env_uri:
        env["MLFLOW_TRACKING_URI"] = env_uri
    p = subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"varsr {' '.join(args[:2])} failed:\n{p.stderr[-4000:]}"
    return p


def _pieces(password: str) -> list[str]:
    return sorted({password, quote(password, safe=""), quote(password), password.rsplit("-", 1)[-1]})


def _leaks(password: str, texts: dict[str, str], folders: list[Path]) -> list[str]:
    """Where any form of ``password`` appears: among ``texts`` (name -> captured output) and in any file under
    ``folders`` (read as bytes: databases, weights and images included)."""
    found = [f"{name}: {p!r}" for name, t in texts.items() for p in _pieces(password) if p in t]
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                found += [f"{f}: {p!r}" for p in _pieces(password) if p.encode() in data]
    return found


def test_no_tracking_credential_in_any_output_artifact_or_log(
    shards, tmp_path, loopback_mlflow, monkeypatch, caplog, capsys
):
    from mlflow.tracking import MlflowClient

    from inference.registry import register_training_run

    port, server_root, server_log = loopback_mlflow
    work = tmp_path / "work"
    work.mkdir()
    pw_set = f"p@ss:w/rd-{secrets.token_hex(8)}"  # '@', ':' and '/' percent-encoded in the URI
    pw_env = f"envpass-{secrets.token_hex(8)}"
    uri_set = f"http://varsr:{quote(pw_set, safe='')}@127.0.0.1:{port}"
    uri_env = f"http://varsr:{pw_env}@127.0.0.1:{port}"
    shown = f"http://***@127.0.0.1:{port}"

    out = work / "run"
    p = _varsr(
        [
            "train",
            "isr",
            *[
                a
                for o in [
                    f"output_dir={out}",
                    f"data.shards={shards}",
                    *TRAIN,
                    f"tracking.tracking_uri={uri_set}",
                    "register.name=secret-set",
                ]
                for a in ("--set", o)
            ],
        ],
        work,
        uri_env,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["tracking_uri"] == shown, "the store is named, without secret"
    assert f"at {shown}" in p.stderr, "the start line still names the store"

    # registered again from summary.json alone, as a run tracked through $MLFLOW_TRACKING_URI is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_set)
    with caplog.at_level("INFO"):
        mv = register_training_run(out, "secret-env", "champion")
    logged = caplog.text + "".join(capsys.readouterr())
    assert f"in {shown}" in logged, "the registration's log line names the store"

    # everything went through the server: the run, its two registrations from the training run
    client = MlflowClient(f"http://127.0.0.1:{port}")
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    for name in ("secret-set", "secret-env"):
        assert client.get_model_version_by_alias(name, "champion").run_id == summary["mlflow_run_id"], name
    assert mv.name == "secret-env"

    texts = {
        "train.stdout": p.stdout,
        "train.stderr": p.stderr,
        "register log": logged,
        "server log": server_log.read_text(errors="replace"),
    }
    folders = [work, server_root]
    leaks = _leaks(pw_set, texts, folders) + _leaks(pw_env, texts, folders)
    assert not leaks, "planted tracking password found in:\n" + "\n".join(leaks[:40])
