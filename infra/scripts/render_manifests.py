#!/usr/bin/env python3
"""Render the cluster recipes with the platform image filled in.

The KubeRay manifests (infra/kuberay/*.yaml), the model endpoint's (infra/k8s/*.yaml) and the Ray cluster launcher
config (infra/ray/cluster.yaml) name the image only as ``${VARSR_IMAGE}``. Its value comes from ONE place: the
environment variable ``VARSR_IMAGE`` when set, else ``infra/docker/image.env`` (the file the build/push commands read
too). This script writes ready-to-apply copies:

    python3 infra/scripts/render_manifests.py                 # -> build/cluster/{kuberay,ray,k8s}/...
    kubectl apply -f build/cluster/kuberay/raycluster.yaml
    ray up build/cluster/ray/cluster.yaml

Only the exact token ``${VARSR_IMAGE}`` is replaced (shell variables such as ``$RAY_HEAD_IP`` in the launcher's
commands are left for the nodes). Templates named ``*.example.yaml`` (secrets with placeholders) are not rendered:
fill them in yourself. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ENV = ROOT / "infra/docker/image.env"
TOKEN = "${VARSR_IMAGE}"
TEMPLATES = {"kuberay": ROOT / "infra/kuberay", "ray": ROOT / "infra/ray", "k8s": ROOT / "infra/k8s"}
# registry/name[:tag][@sha256:digest], lower-case path components as OCI references require
IMAGE_RE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
)


def image_from_env_file(path: Path = IMAGE_ENV) -> str:
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "VARSR_IMAGE":
            return value.strip().strip("'\"")
    raise SystemExit(f"error: {path} has no VARSR_IMAGE=... line")


def resolve_image(explicit: str | None = None) -> str:
    image = explicit or os.environ.get("VARSR_IMAGE") or image_from_env_file()
    if not IMAGE_RE.match(image) or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
        raise SystemExit(f"error: {image!r} is not a pinned image reference (registry/name:tag or @sha256:...)")
    return image


def templates() -> list[tuple[str, Path]]:
    """(group, path) of every recipe that names the image, examples excluded."""
    out = []
    for group, folder in TEMPLATES.items():
        for p in sorted(folder.glob("*.yaml")):
            if not p.name.endswith(".example.yaml"):
                out.append((group, p))
    return out


def render(out_dir: Path, image: str) -> list[Path]:
    written = []
    for group, src in templates():
        dst = out_dir / group / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text().replace(TOKEN, image))
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", help="image reference (default: $VARSR_IMAGE, else infra/docker/image.env)")
    ap.add_argument("--out", default=str(ROOT / "build/cluster"), help="output folder (default: build/cluster)")
    args = ap.parse_args(argv)
    image = resolve_image(args.image)
    for p in render(Path(args.out), image):
        print(p)
    print(f"image: {image}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
