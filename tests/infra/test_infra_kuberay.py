"""The KubeRay recipes (infra/kuberay/) are valid objects and fit together: every manifest passes a structural
schema of the ray.io/v1 and core v1 fields we use (unknown or misplaced keys fail), and the cluster can actually run
the jobs: reachable dashboard, in-tree autoscaling with room for the largest train config, the volumes the configs
point at, secrets by reference only, rayVersion equal to the pin, RayJobs that select the RayCluster.

The schemas below are written from KubeRay's CRDs (ray.io/v1 RayCluster, RayJob) and the core v1 objects, restricted
to the fields the recipes use, with ``additionalProperties: false`` at every level. Names and limits follow KubeRay's
own validation (RayCluster names are DNS-1035 labels of at most 53 characters, RayJob names at most 47;
``rayStartParams`` values are strings).
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "infra/kuberay"

# ------------------------------------------------------------------------------------------------------ schemas
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_RE = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def obj(props: dict, required: tuple = (), **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False, **extra}


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT0 = {"type": "integer", "minimum": 0}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": QUANTITY_RE}]}
RESOURCE_LIST = {
    "type": "object",
    "additionalProperties": QUANTITY,
    "propertyNames": {"pattern": r"^([a-z0-9.-]+/)?[a-z0-9-]+$"},
}
RESOURCES = obj({"limits": RESOURCE_LIST, "requests": RESOURCE_LIST})
METADATA = obj(
    {
        "name": {"type": "string", "pattern": DNS1123, "maxLength": 253},
        "namespace": STR,
        "labels": STR_MAP,
        "annotations": STR_MAP,
    }
)

SECRET_KEY_REF = obj({"name": {"type": "string", "pattern": DNS1123}, "key": STR, "optional": BOOL}, ("name", "key"))
ENV_VAR = obj(
    {
        "name": {"type": "string", "pattern": ENV_NAME},
        "value": STR,
        "valueFrom": obj({"secretKeyRef": SECRET_KEY_REF, "configMapKeyRef": SECRET_KEY_REF}),
    },
    ("name",),
)
ENV_FROM = obj(
    {
        "secretRef": obj({"name": {"type": "string", "pattern": DNS1123}, "optional": BOOL}, ("name",)),
        "configMapRef": obj({"name": {"type": "string", "pattern": DNS1123}, "optional": BOOL}, ("name",)),
        "prefix": STR,
    },
    minProperties=1,
)
PORT = obj(
    {
        "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
        "name": {"type": "string", "pattern": DNS1123, "maxLength": 15},
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
    },
    ("containerPort",),
)
VOLUME_MOUNT = obj(
    {
        "name": {"type": "string", "pattern": DNS1123},
        "mountPath": {"type": "string", "pattern": "^/"},
        "readOnly": BOOL,
        "subPath": STR,
    },
    ("name", "mountPath"),
)
CONTAINER = obj(
    {
        "name": {"type": "string", "pattern": DNS1123, "maxLength": 63},
        "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": {"type": "array", "items": STR},
        "args": {"type": "array", "items": STR},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array", "items": ENV_FROM},
        "ports": {"type": "array", "items": PORT},
        "resources": RESOURCES,
        "volumeMounts": {"type": "array", "items": VOLUME_MOUNT},
        "securityContext": {"type": "object"},
        "workingDir": STR,
    },
    ("name", "image"),
)
VOLUME = obj(
    {
        "name": {"type": "string", "pattern": DNS1123, "maxLength": 63},
        "persistentVolumeClaim": obj(
            {"claimName": {"type": "string", "pattern": DNS1123}, "readOnly": BOOL}, ("claimName",)
        ),
        "emptyDir": obj({"medium": {"enum": ["", "Memory"]}, "sizeLimit": QUANTITY}),
        "secret": obj({"secretName": STR, "defaultMode": INT0}, ("secretName",)),
        "configMap": obj({"name": STR, "defaultMode": INT0}, ("name",)),
    },
    ("name",),
    minProperties=2,
    maxProperties=2,
)  # a name and exactly one source
TOLERATION = obj(
    {
        "key": STR,
        "operator": {"enum": ["Exists", "Equal"]},
        "value": STR,
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    }
)
POD_SPEC = obj(
    {
        "containers": {"type": "array", "items": CONTAINER, "minItems": 1},
        "volumes": {"type": "array", "items": VOLUME},
        "securityContext": obj({"fsGroup": INT0, "runAsUser": INT0, "runAsGroup": INT0, "runAsNonRoot": BOOL}),
        "tolerations": {"type": "array", "items": TOLERATION},
        "nodeSelector": STR_MAP,
        "affinity": {"type": "object"},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
        "serviceAccountName": STR,
        "imagePullSecrets": {"type": "array", "items": obj({"name": STR}, ("name",))},
    },
    ("containers",),
)
POD_TEMPLATE = obj({"metadata": obj({"labels": STR_MAP, "annotations": STR_MAP}), "spec": POD_SPEC}, ("spec",))
RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}

HEAD_GROUP = obj(
    {
        "rayStartParams": RAY_START_PARAMS,
        "template": POD_TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "enableIngress": BOOL,
    },
    ("template",),
)
WORKER_GROUP = obj(
    {
        "groupName": {"type": "string", "pattern": DNS1123, "maxLength": 63},
        "replicas": INT0,
        "minReplicas": INT0,
        "maxReplicas": INT0,
        "idleTimeoutSeconds": INT0,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "rayStartParams": RAY_START_PARAMS,
        "template": POD_TEMPLATE,
        "suspend": BOOL,
    },
    ("groupName", "minReplicas", "maxReplicas", "template"),
)
AUTOSCALER_OPTIONS = obj(
    {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": INT0,
        "resources": RESOURCES,
        "image": STR,
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array", "items": ENV_FROM},
        "securityContext": {"type": "object"},
        "version": {"enum": ["v1", "v2"]},
    }
)
RAY_CLUSTER_SPEC = obj(
    {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": BOOL,
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "suspend": BOOL,
    },
    ("headGroupSpec",),
)

RAY_CLUSTER = obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": obj(
            {
                "name": {"type": "string", "pattern": DNS1035, "maxLength": 53},
                "namespace": STR,
                "labels": STR_MAP,
                "annotations": STR_MAP,
            },
            ("name",),
        ),
        "spec": RAY_CLUSTER_SPEC,
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

RAY_JOB = obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": obj(
            {
                "name": {"type": "string", "pattern": DNS1035, "maxLength": 47},
                "namespace": STR,
                "labels": STR_MAP,
                "annotations": STR_MAP,
            },
            ("name",),
        ),
        "spec": obj(
            {
                "entrypoint": {"type": "string", "minLength": 1},
                "clusterSelector": STR_MAP,
                "rayClusterSpec": RAY_CLUSTER_SPEC,
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "submitterPodTemplate": POD_TEMPLATE,
                "runtimeEnvYAML": STR,
                "shutdownAfterJobFinishes": BOOL,
                "ttlSecondsAfterFinished": INT0,
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": INT0,
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "entrypointResources": STR,
                "jobId": STR,
                "suspend": BOOL,
                "metadata": STR_MAP,
            },
            ("entrypoint",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

PVC = obj(
    {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "PersistentVolumeClaim"},
        "metadata": obj(
            {
                "name": {"type": "string", "pattern": DNS1123},
                "namespace": STR,
                "labels": STR_MAP,
                "annotations": STR_MAP,
            },
            ("name",),
        ),
        "spec": obj(
            {
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                },
                "resources": obj({"requests": obj({"storage": QUANTITY}, ("storage",))}, ("requests",)),
                "storageClassName": STR,
                "volumeMode": {"enum": ["Filesystem", "Block"]},
            },
            ("accessModes", "resources"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

SECRET = obj(
    {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "Secret"},
        "metadata": obj(
            {"name": {"type": "string", "pattern": DNS1123}, "namespace": STR, "labels": STR_MAP}, ("name",)
        ),
        "type": STR,
        "stringData": {"type": "object", "additionalProperties": STR, "propertyNames": {"pattern": ENV_NAME}},
        "data": STR_MAP,
    },
    ("apiVersion", "kind", "metadata"),
)

BY_KIND = {"RayCluster": RAY_CLUSTER, "RayJob": RAY_JOB, "PersistentVolumeClaim": PVC, "Secret": SECRET}


# -------------------------------------------------------------------------------------------------------- tests
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in _all_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _cluster() -> dict:
    return _one("RayCluster")


def _pod_specs(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for g in spec.get("workerGroupSpecs", []):
        out[g["groupName"]] = g["template"]["spec"]
    return out


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==")[1] for d in deps if re.match(r"ray(\[[^\]]*\])?==", d)]
    assert len(pins) == 1
    return pins[0]


def _quantity(q) -> float:
    """CPU / GPU counts and memory in base units (enough of the Kubernetes quantity grammar for our manifests)."""
    s = str(q)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", s)
    assert m, s
    return float(m.group(1)) * units.get(m.group(2), 1)


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_matches_its_schema(path):
    docs = _docs(path)
    assert docs
    for doc in docs:
        assert doc.get("kind") in BY_KIND, f"{path.name}: unexpected kind {doc.get('kind')}"
        jsonschema.validate(doc, BY_KIND[doc["kind"]])


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda c: c["spec"].update(enableInTreeAutoscalling=True), "misspelt spec key"),
        (lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "non-string rayStartParam"),
        (lambda c: c["spec"]["workerGroupSpecs"][0].pop("maxReplicas"), "worker group without maxReplicas"),
        (
            lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(envfrom=[]),
            "misspelt field",
        ),
        (
            lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].update(cpu="lots"),
            "bad quantity",
        ),
        (lambda c: c["metadata"].update(name="Varsr_Cluster"), "name not a DNS-1035 label"),
    ],
)
def test_schema_rejects_broken_clusters(mutate, where):
    """The schema is strict: each single mistake below is refused (so the positive test above means something)."""
    bad = copy.deepcopy(_cluster())
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_CLUSTER)


def test_ray_version_equals_the_pin():
    assert _cluster()["spec"]["rayVersion"] == _ray_pin()
    for _, d in _all_objects():
        if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            assert d["spec"]["rayClusterSpec"]["rayVersion"] == _ray_pin()


def test_dashboard_is_reachable_by_the_job_submitter():
    head = _cluster()["spec"]["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"  # KubeRay's default; not loopback
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports.get("dashboard") == 8265
    assert head["rayStartParams"].get("num-cpus") == "0"  # the head runs drivers, not tasks


def test_autoscaling_has_room_for_every_cluster_train_config():
    spec = _cluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    configs = sorted((ROOT / "configs/train").glob("*cluster*.yaml"))
    assert configs
    for path in configs:
        ray_cfg = yaml.safe_load(path.read_text())["ray"]
        need = ray_cfg["num_workers"]
        gpw, cpw = ray_cfg.get("gpus_per_worker", 1) if ray_cfg.get("use_gpu") else 0, ray_cfg.get("cpus_per_worker", 1)
        fits = 0
        for g in groups:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus, cpus = _quantity(limits.get("nvidia.com/gpu", 0)), _quantity(limits["cpu"])
            if gpw and gpus < gpw:
                continue
            per_pod = min(int(gpus // gpw) if gpw else 10**9, int(cpus // cpw))
            fits += per_pod * g["maxReplicas"]
        assert fits >= need, f"{path.name}: {need} workers x ({gpw} GPU, {cpw} CPU) but the groups hold {fits}"


def test_volumes_cover_every_path_the_configs_use():
    cluster = _cluster()
    claims = {d["metadata"]["name"]: d for _, d in _all_objects() if d["kind"] == "PersistentVolumeClaim"}
    paths = []
    for path in sorted((ROOT / "configs/train").glob("*cluster*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        paths += [cfg["output_dir"], cfg["data"]["shards"], *cfg["model"].values()]
    for job in (d for _, d in _all_objects() if d["kind"] == "RayJob"):
        toks = shlex.split(job["spec"]["entrypoint"])
        paths += [toks[i + 1] for i, t in enumerate(toks[:-1]) if t in ("--output", "--input")]
    local_roots = {"/" + p.split("/")[1] for p in paths if isinstance(p, str) and p.startswith("/")}
    assert local_roots, "no local paths found: the check would be empty"
    for name, pod in _pod_specs(cluster).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = pod["containers"][0].get("volumeMounts", [])
        for m in mounts:
            assert m["name"] in volumes, f"{name}: mount {m['name']} has no volume"
        mounted = {m["mountPath"] for m in mounts}
        for root in local_roots:
            assert root in mounted, f"{name} pods do not mount {root}, which the configs/jobs use"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                claim = claims.get(v["persistentVolumeClaim"]["claimName"])
                assert claim, f"{name}: PVC {v['persistentVolumeClaim']['claimName']} is not defined in storage.yaml"
                assert "ReadWriteMany" in claim["spec"]["accessModes"], "every pod mounts it: must be ReadWriteMany"


def test_secrets_by_reference_with_the_s3_endpoint_and_mlflow():
    example = {d["metadata"]["name"]: d for d in _docs(KUBERAY / "secrets.example.yaml")}
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(example["varsr-s3"]["stringData"])
    assert "MLFLOW_TRACKING_URI" in example["varsr-mlflow"]["stringData"]
    for secret in example.values():  # a template: every value is a <placeholder>, never a credential
        for key, value in secret["stringData"].items():
            assert value.startswith("<") and value.endswith(">"), f"{key} is not a placeholder"
    for name, pod in _pod_specs(_cluster()).items():
        c = pod["containers"][0]
        refs = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
        assert {"varsr-s3", "varsr-mlflow"} <= refs, f"{name} pods miss a secret"
        assert refs <= set(example), f"{name}: references a secret the template does not describe"
        for e in c.get("env", []):  # no literal credentials in plain env entries
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", e["name"]) or "valueFrom" in e, e["name"]


def test_rayjobs_select_the_cluster_and_run_from_the_image_workdir():
    cluster_name = _cluster()["metadata"]["name"]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "infra/docker/Dockerfile").read_text(), re.M)[-1]
    jobs = [d for _, d in _all_objects() if d["kind"] == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} == {"varsr-data-build", "varsr-train-isr"}
    for job in jobs:
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}
        # KubeRay: a selected (not owned) cluster is never deleted, a TTL needs shutdownAfterJobFinishes, and
        # backoffLimit is refused in selector mode
        assert spec.get("shutdownAfterJobFinishes") is False and "ttlSecondsAfterFinished" not in spec
        assert spec.get("backoffLimit", 0) == 0
        assert spec["entrypoint"].startswith(f"cd {workdir} && varsr "), spec["entrypoint"]
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
        submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
        assert "command" not in submitter  # KubeRay fills in `ray job submit` against the head service
