"""The model endpoint's Kubernetes manifests (infra/k8s/) and its entry point (infra/docker/serve-entrypoint.sh).

Every object, rendered from the one image reference by infra/scripts/render_manifests.py, is validated offline
against the upstream Kubernetes JSON schemas in their strict form (unknown keys fail), as shipped by the
``kubernetes-validate`` package for Kubernetes 1.37; a broken copy of each is refused. On top of the schema: the
objects fit together (selectors, named ports, the HPA's target), the probes use the endpoint's health paths, the
memory is sized from the measured memory per worker, credentials come from Secrets only, and the entry point turns
its environment into the `varsr serve` command line.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import torch
import yaml

from inference.config import load_inference_config
from inference.serve import MEMORY_SHARE, WORKER_BASE_BYTES, worker_memory_bytes
from inference.serve_metrics import LIVE_PATH, METRICS_PATH, READY_PATH

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra/k8s"
ENTRYPOINT = ROOT / "infra/docker/serve-entrypoint.sh"
K8S_VERSION = "1.37.0"


def _quantity(q) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("rendered")
    subprocess.run(
        [sys.executable, str(ROOT / "infra/scripts/render_manifests.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "VARSR_IMAGE"},
    )
    docs = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((out / "k8s").glob("*.yaml"))}
    for p in sorted(K8S.glob("*.example.yaml")):  # templates are not rendered (they name no image): validate as is
        docs[p.name] = [d for d in yaml.safe_load_all(p.read_text()) if d]
    assert "serve.yaml" in docs and "hpa-in-flight.example.yaml" in docs
    return docs


def _objects(rendered) -> list[dict]:
    return [d for docs in rendered.values() for d in docs]


def _one(rendered, kind: str, file: str = "serve.yaml") -> dict:
    found = [d for d in rendered[file] if d["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def _container(rendered) -> dict:
    return _one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _env(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_every_object_passes_the_strict_upstream_schema(rendered):
    kinds = []
    for doc in _objects(rendered):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]


@pytest.mark.parametrize(
    "kind, mutate, where",
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}), "misspelt"),
        ("Deployment", lambda d: d["spec"].update(replicas="2"), "replicas as a string"),
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="x"),
            "port not a number",
        ),
        ("Service", lambda d: d["spec"]["ports"][0].update(targetport="http"), "misspelt targetPort"),
        (
            "HorizontalPodAutoscaler",
            lambda d: d["spec"]["metrics"][0]["resource"].update(targetAverage=70),
            "autoscaling/v1-style field in v2",
        ),
        ("PodDisruptionBudget", lambda d: d["spec"].update(minAvailble=1), "misspelt"),
    ],
)
def test_the_schema_refuses_broken_copies(rendered, kind, mutate, where):
    bad = copy.deepcopy(_one(rendered, kind))
    mutate(bad)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_objects_fit_together(rendered):
    dep, svc = _one(rendered, "Deployment"), _one(rendered, "Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert _one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    c = _container(rendered)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    assert ports["http"] == int(_env(c)["VARSR_SERVE_PORT"])
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] == METRICS_PATH and int(ann["prometheus.io/port"]) == ports["http"]
    for file in ("serve.yaml", "hpa-in-flight.example.yaml"):
        hpa = _one(rendered, "HorizontalPodAutoscaler", file)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": dep["metadata"]["name"],
        }
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metric = _one(rendered, "HorizontalPodAutoscaler", "hpa-in-flight.example.yaml")["spec"]["metrics"][0]
    assert metric["pods"]["metric"]["name"] == "varsr_requests_in_flight"  # a gauge the endpoint exports


def test_probes_use_the_health_endpoints_and_the_stop_fits_the_grace_period(rendered):
    c = _container(rendered)
    assert c["livenessProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": LIVE_PATH, "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "http"}
    # the startup probe covers the model's download and load: at least 5 minutes
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    grace = _one(rendered, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) + int(_env(c)["VARSR_STOP_TIMEOUT"]) < grace


@pytest.mark.slow
def test_memory_is_sized_from_the_measured_memory_per_worker(rendered):
    """Per worker: the measured idle worker (WORKER_BASE_BYTES) + the released model's weights (counted on the meta
    device, nothing allocated) + one request at the memory budget; the limit leaves `varsr serve`'s 20 % share."""
    from model import VARSRConfig, build

    with torch.device("meta"):
        vq, varsr = build(VARSRConfig.preset("d24"))
    weights = sum(t.numel() * t.element_size() for m in (vq, varsr) for t in (*m.parameters(), *m.buffers()))
    c = _container(rendered)
    env = _env(c)
    sets = dict(item.split("=", 1) for item in env["VARSR_SERVE_SET"].split())
    budget = load_inference_config(
        overrides=[f"{k}={v}" for k, v in sets.items() if k.startswith("serving.")]
    ).serving.max_request_memory_mb
    workers = int(env["VARSR_WORKERS"])
    need = workers * worker_memory_bytes(weights, budget) / MEMORY_SHARE
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert _quantity(req["memory"]) == _quantity(lim["memory"])  # Guaranteed QoS
    assert need <= _quantity(lim["memory"]) < need + 2 * 2**30, (need / 2**30, lim["memory"])
    assert _quantity(req["cpu"]) == workers * int(sets["runtime.cpu_threads"])  # one core per worker thread
    assert 256 * 2**20 <= WORKER_BASE_BYTES <= 2 * 2**30


def test_credentials_only_from_secrets_and_the_model_by_uri_and_alias(rendered):
    c = _container(rendered)
    example = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((ROOT / "infra/kuberay/secrets.example.yaml").read_text())
        if d
    }
    refs = {e["secretRef"]["name"] for e in c["envFrom"]}
    assert refs == {"varsr-mlflow", "varsr-s3"} and refs <= set(example)
    assert "MLFLOW_TRACKING_URI" in example["varsr-mlflow"]["stringData"]
    for e in c["env"]:
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|TRACKING_URI", e["name"]), e["name"]
    assert re.fullmatch(r"models:/[^/@]+@[A-Za-z0-9_-]+", _env(c)["VARSR_MODEL_URI"])
    assert c["image"] == (ROOT / "infra/docker/image.env").read_text().split("VARSR_IMAGE=")[1].split()[0]
    assert c["command"] == ["bash", "/opt/varsr/infra/docker/serve-entrypoint.sh"]  # WORKDIR /opt/varsr: COPY . .
    sc = _one(rendered, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False


def _run_entrypoint(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The entry point with a `varsr` first on PATH that prints the arguments it was given, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "varsr"
    shim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    shim.chmod(0o755)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ENTRYPOINT)], env={**base, **env}, capture_output=True, text=True)


def test_entrypoint_builds_the_serve_command_from_its_environment(tmp_path, rendered):
    res = _run_entrypoint(tmp_path, {})
    assert res.returncode == 2 and res.stderr.strip().startswith("error: set VARSR_MODEL_URI")
    env = {k: v for k, v in _env(_container(rendered)).items() if v is not None}
    res = _run_entrypoint(tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:-1] == [
        "serve",
        "models:/varsr@champion",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--stop-timeout",
        "45",
        "--workers",
        "2",
        "--set",
        "runtime.cpu_threads=1",
        "--set",
        "runtime.device=cpu",
    ]
    res = _run_entrypoint(tmp_path, {"VARSR_MODEL_URI": "models:/m@a"})  # workers chosen by varsr serve
    assert "--workers" not in res.stdout.split() and "--set" not in res.stdout.split()
