"""Screenshots of the MLflow UI on a demo's store, taken with a headless browser, for docs/ (and the README).

    python infra/scripts/ui_screenshots.py [--workdir DEMO] [--out docs/screenshots]

Without ``--workdir`` it first runs the reduced demo (a few finetuning steps) in a temporary folder. It then starts
``mlflow ui`` on that store on 127.0.0.1 and drives Debian's ``chromium`` (``apt-get install chromium``) headless
through Playwright (``pip install playwright``; no browser download: it uses that chromium), as a user would: the
"Model training" view of the experiment with the parent run expanded (the run tree), the stage-2 training run with
its logged and registered model, a validation sample grid in the artifact viewer, and the registered version. Prints
one JSON object naming the files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


def reduced_demo(workdir: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "demo",
            "--workdir",
            str(workdir),
            "--stage2-steps",
            "4",
            "--batch-size",
            "2",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def start_ui(store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    from infra.core.net import free_port
    from infra.core.tracking import relocate_local_store

    uri = f"sqlite:///{store}"
    relocate_local_store(uri)
    port = free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    proc = subprocess.Popen(
        [exe, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"mlflow ui did not start:\n{log.read_text()[-2000:]}")


class Browser:
    """A headless chromium page (Playwright driving Debian's chromium) that photographs MLflow UI pages."""

    def __init__(self, size: tuple[int, int] = (1500, 950)):
        from playwright.sync_api import sync_playwright

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("chromium is not installed: apt-get install -y chromium")
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS[1:])
        self.page = self._browser.new_page(viewport={"width": size[0], "height": size[1]})
        self._assistant_closed = False

    def open(self, url: str, settle_ms: int = 3500) -> None:
        self.page.goto(url)
        self.page.wait_for_load_state("domcontentloaded")
        self.page.wait_for_timeout(settle_ms)
        if not self._assistant_closed:  # MLflow 3 opens its assistant side panel on the first page
            close = self.page.get_by_role("button", name="Close")
            if close.count():
                close.first.click()
                self.page.wait_for_timeout(500)
            self._assistant_closed = True

    def model_training_view(self) -> None:
        self.page.get_by_text("Model training", exact=True).first.click()
        self.page.wait_for_timeout(1500)

    def expand_first_run(self) -> None:
        """Unfold the first (parent) run's children in the runs table."""
        button = self.page.locator(".ag-row [col-id='attributes.`Run Name`'] button").first
        if button.count():
            button.click()
            self.page.wait_for_timeout(1500)

    def shot(self, out: Path) -> Path:
        self.page.screenshot(path=str(out))
        return out

    def height(self, h: int) -> None:
        """The UI scrolls inside its own panes, so a taller window is how a whole run page gets into one shot."""
        self.page.set_viewport_size({"width": self.page.viewport_size["width"], "height": h})

    def close(self) -> None:
        self._browser.close()
        self._pw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="an existing demo folder (default: run the reduced demo in a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="varsr-screens-"))
    try:
        w = Path(args.workdir) if args.workdir else tmp / "demo"
        if not args.workdir:
            reduced_demo(w)
        from mlflow.tracking import MlflowClient

        store = w / "mlflow.db"
        proc, url = start_ui(store, tmp / "ui.log")
        try:
            client = MlflowClient(tracking_uri=f"sqlite:///{store}")
            exp = client.get_experiment_by_name("varsr-demo")
            mv = client.get_model_version_by_alias("varsr-demo", "champion")
            train_run = client.get_run(mv.run_id)
            grids = [a.path for a in client.list_artifacts(train_run.info.run_id, "samples")]
            base = f"{url}/#/experiments/{exp.experiment_id}"
            b = Browser()
            files = {}
            try:
                b.open(f"{base}/runs")
                b.model_training_view()
                b.expand_first_run()
                files["run_tree.png"] = str(b.shot(out / "run_tree.png"))
                b.height(1250)
                b.open(f"{base}/runs/{train_run.info.run_id}")
                files["training_run.png"] = str(b.shot(out / "training_run.png"))
                b.height(950)
                if grids:
                    b.open(f"{base}/runs/{train_run.info.run_id}/artifacts/{grids[-1]}")
                    files["sample_grid.png"] = str(b.shot(out / "sample_grid.png"))
                b.open(f"{url}/#/models/varsr-demo/versions/{mv.version}")
                files["registered_model.png"] = str(b.shot(out / "registered_model.png"))
            finally:
                b.close()
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        print(
            json.dumps(
                {
                    "screenshots": files,
                    "ui": f"mlflow ui on {store}",
                    "browser": "chromium (headless, via Playwright)",
                    "experiment": exp.experiment_id,
                    "training_run": train_run.info.run_id,
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
