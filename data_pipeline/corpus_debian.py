"""Corpus recipe: photo wallpapers from Debian packages, fetched with ``apt-get download`` and unpacked offline.

Debian ships desktop wallpapers as ordinary packages (``plasma-workspace-wallpapers``, ``mate-backgrounds``, ...).
They are real, licensed photographs at 2-5 K resolution, reachable wherever the package archive is, which makes
them a reproducible offline corpus for a CPU-sized base model. The recipe:

1. ``fetch_debs``      ``apt-get download NAME`` for each package (no installation, no root needed for the files);
                       name, version, licence(s) and sha256 of every .deb are recorded.
2. ``extract_images``  reads the .deb's data tarball (``dpkg-deb --fsys-tarfile``) and writes the image members that
                       match the package's include globs (photographs rather than drawings, chosen per package), one
                       file per wallpaper: KDE-style packages ship one wallpaper at many resolutions under
                       ``<name>/contents/images*/WxH.ext`` and only the largest is kept.
3. ``tile_images``     cuts every photo into fixed-size tiles at several scales (short side resized to each of
                       ``short_sides``), so a few dozen photos give a few thousand training crops at the content
                       scales SR sees; ``varsr data build`` then curates the tiles (decode checks, scores, dedup,
                       clusters, degradation, shards).

Packages whose names start with one of ``HELD_OUT_PREFIXES`` (``lomiri-``, ``ukui-``) are refused for training:
they are the independent evaluation set, fetched by the same code into a separate folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from infra.core.errors import UserError

HELD_OUT_PREFIXES = ("lomiri-", "ukui-")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_KDE_SIZE = re.compile(r"(\d+)x(\d+)\.[a-z]+$", re.IGNORECASE)


@dataclass
class PackageSpec:
    """One Debian package and which of its images to take (globs on the member path, without a leading ``./``)."""

    name: str
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)


@dataclass
class DebInfo:
    """What was fetched: recorded in the corpus manifest and the model card."""

    name: str
    version: str
    file: str
    sha256: str
    licenses: list[str]
    images: list[str] = field(default_factory=list)


def check_training_packages(specs: list[PackageSpec]) -> None:
    """Refuse held-out packages in a training list (they are the independent evaluation set)."""
    bad = [s.name for s in specs if s.name.startswith(HELD_OUT_PREFIXES)]
    if bad:
        raise UserError(
            f"packages {', '.join(bad)} are held out for evaluation (prefixes "
            f"{', '.join(HELD_OUT_PREFIXES)}) and cannot be used for training"
        )


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} is not installed (the Debian corpus recipe needs apt-get and dpkg-deb)") from None
    if res.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed (exit {res.returncode}): {res.stderr.strip()[-400:]}")
    return res.stdout


def deb_field(deb: Path, name: str) -> str:
    """A control field of a .deb (``Package``, ``Version``, ...)."""
    return _run(["dpkg-deb", "-f", str(deb), name]).strip()


def fetch_debs(names: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` each package into ``dest`` (skipped when a .deb of that package is already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        have = sorted(dest.glob(f"{name}_*.deb"))
        if not have:
            _run(["apt-get", "download", name], cwd=dest)
            have = sorted(dest.glob(f"{name}_*.deb"))
            if not have:
                raise UserError(f"apt-get download {name} wrote no .deb into {dest}")
        out.append(have[-1])
    return out


def _members(deb: Path) -> tarfile.TarFile:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, timeout=900)
    if data.returncode != 0:
        raise UserError(f"dpkg-deb --fsys-tarfile {deb} failed: {data.stderr.decode(errors='replace')[-300:]}")
    return tarfile.open(fileobj=io.BytesIO(data.stdout), mode="r:")


def licenses_of(tf: tarfile.TarFile, package: str) -> list[str]:
    """Licence names declared in the package's machine-readable ``copyright`` file (``License:`` lines)."""
    for m in tf.getmembers():
        if m.isfile() and m.name.lstrip("./") == f"usr/share/doc/{package}/copyright":
            text = tf.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("License:")]
            return sorted({n for n in names if n})
    return []


def wallpaper_key(path: str) -> str:
    """Group key of one wallpaper: ``.../<name>/contents/images_dark/WxH.jpg`` -> ``.../<name>:dark``."""
    if "/contents/" in path:
        head, tail = path.split("/contents/", 1)
        return head + (":dark" if tail.startswith("images_dark/") else "")
    return path


def _pixels_hint(path: str, size: int) -> int:
    m = _KDE_SIZE.search(path)
    return int(m.group(1)) * int(m.group(2)) if m else size


def select_members(names_sizes: list[tuple[str, int]], spec: PackageSpec) -> list[str]:
    """Image members matching the spec, screenshots dropped, the largest file of each wallpaper kept."""
    best: dict[str, tuple[int, str]] = {}
    for name, size in names_sizes:
        p = name.lstrip("./")
        base = p.rsplit("/", 1)[-1].lower()
        if not base.endswith(IMAGE_SUFFIXES) or base.startswith("screenshot"):
            continue
        if not any(fnmatch.fnmatch(p, g) for g in spec.include) or any(fnmatch.fnmatch(p, g) for g in spec.exclude):
            continue
        k = wallpaper_key(p)
        score = _pixels_hint(p, size)
        if k not in best or score > best[k][0]:
            best[k] = (score, p)
    return sorted(p for _, p in best.values())


def extract_images(deb: Path, spec: PackageSpec, out_dir: Path) -> DebInfo:
    """Write the selected images of one .deb under ``out_dir/<package>/`` (flat names); returns what was taken."""
    tf = _members(deb)
    members = {m.name.lstrip("./"): m for m in tf.getmembers() if m.isfile()}
    chosen = select_members([(n, m.size) for n, m in members.items()], spec)
    d = out_dir / spec.name
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for p in chosen:
        k = wallpaper_key(p)
        stem = k.rsplit("/", 1)[-1].replace(":", "_") if "/contents/" in p else Path(p).stem
        target = d / f"{stem}{Path(p).suffix.lower()}"
        target.write_bytes(tf.extractfile(members[p]).read())  # type: ignore[union-attr]
        written.append(str(target))
    info = DebInfo(
        name=deb_field(deb, "Package"),
        version=deb_field(deb, "Version"),
        file=deb.name,
        sha256=hashlib.sha256(deb.read_bytes()).hexdigest(),
        licenses=licenses_of(tf, spec.name),
        images=written,
    )
    return info


def fetch_and_extract(specs: list[PackageSpec], debs_dir: Path, images_dir: Path) -> list[DebInfo]:
    """Steps 1 and 2 for a list of packages; also writes ``images_dir/packages.json``."""
    debs = fetch_debs([s.name for s in specs], debs_dir)
    infos = [extract_images(deb, spec, images_dir) for deb, spec in zip(debs, specs)]
    images_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / "packages.json").write_text(json.dumps([i.__dict__ for i in infos], indent=2) + "\n")
    return infos


def tile_images(files: list[str], out_dir: Path, short_sides: list[int], tile: int) -> list[Path]:
    """Every photo resized (LANCZOS) so its short side is each of ``short_sides`` (never upscaled), then cut into
    non-overlapping ``tile`` x ``tile`` PNG tiles on a grid centred in the image. Returns the tile paths."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = 200_000_000  # trusted package files; 5K wallpapers exceed PIL's default warning limit
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for f in files:
        src = Path(f)
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            for side in short_sides:
                if side > min(w, h) or side < tile:
                    continue
                s = side / min(w, h)
                nw, nh = max(tile, round(w * s)), max(tile, round(h * s))
                small = im.resize((nw, nh), Image.Resampling.LANCZOS)
                nx, ny = nw // tile, nh // tile
                x0, y0 = (nw - nx * tile) // 2, (nh - ny * tile) // 2
                for j in range(ny):
                    for i in range(nx):
                        box = (x0 + i * tile, y0 + j * tile, x0 + (i + 1) * tile, y0 + (j + 1) * tile)
                        p = out_dir / f"{src.parent.name}__{src.stem}__s{side}_{j:02d}_{i:02d}.png"
                        small.crop(box).save(p, compress_level=1)
                        written.append(p)
    return written
