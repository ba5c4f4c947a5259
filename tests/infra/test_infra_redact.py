"""The one redaction function (infra/core/redact.py): every form of secret the platform may print, write or log is
masked, everything else is kept exactly; configs are written masked but used as given; the MLflow server recipe
prints a libpq ``?password=`` query masked (issue 28, finding 15). The end-to-end check over a whole training run is
tests/training/test_train_secrets.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.core.redact import MASK, redact, redact_config, restore, secret_key

ROOT = Path(__file__).resolve().parents[2]
PW = "Zq7secretPw91"

MASKED = [  # (text, what it must become)
    (f"http://user:{PW}@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    (f"https://{PW}@github.com/org/repo.git", "https://***@github.com/org/repo.git"),  # a token as the user name
    (f"https://x-access-token:{PW}@host/p", "https://***@host/p"),
    (f"postgresql://mlflow:ab@{PW}:c/d@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
    (f"postgresql+psycopg://ml%40user:{PW}%40%3A%2F@db:5432/m", "postgresql+psycopg://***@db:5432/m"),
    (
        f"postgresql://db:5432/mlflow?user=mlflow&password={PW}&sslmode=require",
        "postgresql://db:5432/mlflow?user=mlflow&password=***&sslmode=require",
    ),
    (f"postgresql://db/m?sslpassword={PW}#frag", "postgresql://db/m?sslpassword=***#frag"),
    (
        f"https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA{PW}%2F20240101"
        f"&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token={PW}&X-Amz-Signature={PW}",
        "https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***",
    ),
    (
        f"https://storage.googleapis.com/b/o?X-Goog-Credential=x{PW}&X-Goog-Signature={PW}",
        "https://storage.googleapis.com/b/o?X-Goog-Credential=***&X-Goog-Signature=***",
    ),
    (
        f"https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2030&sig={PW}",
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2030&sig=***",
    ),
    (f"https://h/shards/{{000..009}}.tar?token={PW}&v=2", "https://h/shards/{000..009}.tar?token=***&v=2"),
    (
        f"https://h/x?access_token={PW};key={PW}&api_key={PW}&secret={PW}",
        "https://h/x?access_token=***;key=***&api_key=***&secret=***",
    ),
    (
        f"host=db port=5432 user=mlflow password={PW} dbname=mlflow",
        "host=db port=5432 user=mlflow password=*** dbname=mlflow",
    ),
    (f"host=db password='{PW} with \\' quote' dbname=m", "host=db password=*** dbname=m"),
    (
        f"MLFLOW_TRACKING_PASSWORD={PW} MLFLOW_TRACKING_TOKEN={PW} aws_secret_access_key={PW}",
        "MLFLOW_TRACKING_PASSWORD=*** MLFLOW_TRACKING_TOKEN=*** aws_secret_access_key=***",
    ),
    (
        f"[train] MLflow run 1f5b (stage2-isr tiny) at http://varsr:{PW}@127.0.0.1:5000",
        "[train] MLflow run 1f5b (stage2-isr tiny) at http://***@127.0.0.1:5000",
    ),
    (
        f"registered varsr version 3 (run ab) in 'http://u:{PW}@h:5000', then https://a:{PW}@b",
        "registered varsr version 3 (run ab) in 'http://***@h:5000', then https://***@b",
    ),
]
KEPT = [  # nothing secret: returned exactly
    "sqlite:////tmp/work/mlflow.db",
    "sqlite:///mlflow.db?mode=ro",
    "models:/varsr@champion",
    "models:/varsr/3",
    "mlflow-artifacts:/1/abc/artifacts",
    "s3://bucket/prefix/key@v2/x.tar",
    "file:///data/shards",
    "http://127.0.0.1:5000",
    "http://[::1]:5000/#/experiments/1",
    "https://h/p?user=mlflow&sslmode=require",
    "https://h/search?q=a@b",
    "data.token_cache=auto max_tokens=5 key=shard-0001 exit code=2 PWD=/home/x",
    "host=db port=5432 user=mlflow dbname=mlflow",
    "[train] step 3/4 loss 5.1234",
    "",
]


@pytest.mark.parametrize("text,shown", MASKED)
def test_secrets_are_masked_and_the_rest_kept(text, shown):
    assert redact(text) == shown
    assert PW not in redact(text)
    assert redact(redact(text)) == redact(text), "idempotent"


@pytest.mark.parametrize("text", KEPT)
def test_text_without_a_secret_is_unchanged(text):
    assert redact(text) == text


def test_non_strings_pass_through():
    assert redact(None) is None and redact(3) == 3


def test_secret_names():
    for name in (
        "password",
        "PASSWORD",
        "sslpassword",
        "MLFLOW_TRACKING_PASSWORD",
        "access_token",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "client_secret",
        "aws_secret_access_key",
        "api-key",
        "private_key",
    ):
        assert secret_key(name), name
    for name in ("token_cache", "max_tokens", "tokens", "keys", "user", "host", "sslkey", "sslmode", "key", "sig"):
        assert not secret_key(name), name
    assert secret_key("key", query=True) and secret_key("sig", query=True) and secret_key("code", query=True)


def test_redact_config_masks_uris_and_secret_keys_in_a_copy():
    data = {
        "tracking": {"tracking_uri": f"http://u:{PW}@h:5000", "experiment": "x"},
        "data": {"shards": [f"https://h/a.tar?token={PW}", "/local/b.tar"], "token_cache": "auto"},
        "db": {"password": PW, "password_file": "", "port": 5432},
    }
    shown = redact_config(data)
    assert shown == {
        "tracking": {"tracking_uri": "http://***@h:5000", "experiment": "x"},
        "data": {"shards": ["https://h/a.tar?token=***", "/local/b.tar"], "token_cache": "auto"},
        "db": {"password": MASK, "password_file": "", "port": 5432},
    }
    assert data["tracking"]["tracking_uri"] == f"http://u:{PW}@h:5000", "the original is untouched"


def test_every_default_config_is_written_unchanged():
    """No config key of the platform is mistaken for a secret: redaction leaves every default config as it is."""
    from data_pipeline.config import BuildConfig
    from inference.config import InferenceConfig
    from infra.core.config import to_dict
    from training.config import TrainConfig
    from training.stage0_vqvae import VQVAETrainConfig

    for cls in (TrainConfig, VQVAETrainConfig, BuildConfig, InferenceConfig):
        assert redact_config(to_dict(cls())) == to_dict(cls()), cls.__name__


def test_saved_config_is_masked_but_the_config_used_keeps_the_uri(tmp_path):
    from infra.core.config import config_hash, load_config, save_config
    from training.config import TrainConfig

    uri = f"http://varsr:{PW}@127.0.0.1:5000"
    cfg = load_config(TrainConfig, None, [f"tracking.tracking_uri={uri}"])
    before = config_hash(cfg)
    for name in ("config.yaml", "resolved.json"):
        save_config(cfg, tmp_path / name)
        text = (tmp_path / name).read_text()
        assert PW not in text and "http://***@127.0.0.1:5000" in text, name
    assert (
        yaml.safe_load((tmp_path / "config.yaml").read_text())["tracking"]["tracking_uri"]
        == "http://***@127.0.0.1:5000"
    )
    assert cfg.tracking.tracking_uri == uri and config_hash(cfg) == before


def test_summary_names_the_store_without_its_credentials():
    from training.run_start import store_ref as _store_ref

    assert _store_ref(f"http://u:{PW}@h:5000", "/out") == {"tracking_uri": "http://***@h:5000"}
    assert _store_ref("http://h:5000", "/out") == {"tracking_uri": "http://h:5000"}


def test_restore_finds_the_full_uri_again_or_says_what_to_give():
    from infra.core.errors import UserError

    full = f"http://u:{PW}@h:5000"
    assert restore("http://***@h:5000", None, "http://u:x@other:5000", full) == full
    assert restore("http://h:5000", full) == "http://h:5000" and restore(None, full) is None
    with pytest.raises(UserError, match=r"http://\*\*\*@h:5000 was recorded without its credentials"):
        restore("http://***@h:5000", "http://u:x@h:5001", "http://h:5000")


def test_a_varsr_process_redacts_its_output_logs_warnings_and_tracebacks():
    """What ``varsr`` installs (infra/cli.py): stdout and stderr writes (MLflow's client prints its 'View run' link
    with the tracking URI), log records (also third-party ones, with their exception text), warnings and an uncaught
    traceback all come out masked."""
    code = f"""
import logging, warnings
from infra.core import redact
redact.install()
redact.install()
import sys
logging.basicConfig(format="%(name)s %(message)s")
sys.stdout.write("View run x at: http://u:{PW}@h:5000/#/experiments/1/runs/2\\n")
print("dsn host=db password={PW}", file=sys.stderr)
logging.getLogger("mlflow.fake").warning("request to %s failed", "http://u:{PW}@h:5000/api")
try:
    raise ValueError("cannot reach postgresql://db/m?password={PW}")
except ValueError:
    logging.getLogger("x").exception("setup failed for host=db password={PW}")
warnings.warn("store MLFLOW_TRACKING_TOKEN={PW} is old")
raise RuntimeError("API request to https://t:{PW}@h/api/2.0 failed")
"""
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 1, p.stderr
    err = p.stderr
    assert PW not in err + p.stdout, err
    assert p.stdout == "View run x at: http://***@h:5000/#/experiments/1/runs/2\n"
    for shown in (
        "dsn host=db password=***",
        "mlflow.fake request to http://***@h:5000/api failed",
        "setup failed for host=db password=***",
        "ValueError: cannot reach postgresql://db/m?password=***",
        "MLFLOW_TRACKING_TOKEN=*** is old",
        "RuntimeError: API request to https://***@h/api/2.0 failed",
    ):
        assert shown in err, err


@pytest.mark.slow
def test_the_cli_error_line_is_redacted(tmp_path):
    """A UserError quoting the store (start_run's 'parent run ... is not in the tracking store URI', here from
    ``varsr register`` against a refused loopback port) is printed as one masked line."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VARSR_PARENT_RUN_ID": "0123456789abcdef",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "register",
            str(ROOT / "model/pretrained/small4-base"),
            "--name",
            "x",
            "--no-validate",
            "--tracking-uri",
            f"http://u:{PW}@127.0.0.1:1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 2, p.stderr
    assert (
        "varsr: error: parent run 0123456789abcdef is not in the tracking store http://***@127.0.0.1:1" in p.stderr
    ), p.stderr
    assert PW not in p.stderr + p.stdout


# ---------------------------------------------------------------- the MLflow server recipe (infra/mlflow/serve.py)
def _serve_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("varsr_mlflow_serve_redact", ROOT / "infra/mlflow/serve.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_recipe_masks_a_libpq_password_query():
    serve = _serve_module()
    b = serve.backend_from_env(
        {"MLFLOW_BACKEND_STORE_URI": f"postgresql://db.internal:5432/mlflow?user=mlflow&password={PW}&sslmode=require"},
        "/tmp",
    )
    assert b.uri.endswith(f"password={PW}&sslmode=require"), "the server gets the URI as given"
    assert b.shown == "postgresql+psycopg://db.internal:5432/mlflow?user=mlflow&password=***&sslmode=require"
    assert PW in b.secrets
    assert serve.mask_credentials(f"postgresql://u:{PW}@db/m") == "postgresql://***@db/m"


def test_recipe_startup_error_does_not_print_a_query_password(tmp_path):
    """The database is down: the one error line names the store, without the password given as ?password=."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MLFLOW_STARTUP_WAIT_S": "0",
        "MLFLOW_BACKEND_STORE_URI": f"postgresql://127.0.0.1:1/mlflow?user=mlflow&password={PW}",
    }
    env.pop("MLFLOW_DB_HOST", None)
    p = subprocess.run(
        ["bash", str(ROOT / "infra/mlflow/start_server.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert (
        "cannot connect to the backend store postgresql+psycopg://127.0.0.1:1/mlflow?user=mlflow&password=***"
        in p.stderr
    ), p.stderr
    assert PW not in p.stderr + p.stdout


def test_an_evaluation_run_records_no_credential_of_its_model_or_data_urls(tmp_path):
    """`varsr eval`'s MLflow run (params, tags, dataset source) and its summary.json name a model or data URL
    without the credentials or signature it carries (issue 28, finding 15: every URI printed, written or logged)."""

    from mlflow.tracking import MlflowClient

    from inference.evaluate import EvalResult, TrackingOptions, _log_mlflow, _write_files

    secret = "Zq7evalSecret"
    model = f"https://user:{secret}@models.example/varsr"
    data = {"hr_dir": f"s3://bucket/test/HR?X-Amz-Signature={secret}", "lr_dir": f"s3://u:{secret}@bucket/test/LR"}
    res = EvalResult(rows=[{"image": "a", "method": "varsr", "psnr_y": 20.0}], summary={"varsr": {"psnr_y": 20.0}})
    out = tmp_path / "eval"
    out.mkdir()
    _write_files(res, out, {**data, "model": model, "baseline": "bicubic"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _log_mlflow(
        res, out, {"scale": 4}, "bicubic", TrackingOptions(uri, "eval-redact"), data, model, "0" * 64, {"tile": "auto"}
    )
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    shown = json.dumps(
        {
            "params": run.data.params,
            "tags": run.data.tags,
            "inputs": [d.dataset.source for d in run.inputs.dataset_inputs],
        }
    )
    assert "models.example" in shown and "bucket/test/HR" in shown  # the URLs are still named
    assert secret not in shown
    summary = (out / "summary.json").read_text()
    assert "models.example" in summary and secret not in summary
