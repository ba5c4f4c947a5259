"""The Debian wallpaper corpus recipe on a small locally built .deb (dpkg-deb --build), no network."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.corpus_debian import (
    PackageSpec,
    check_training_packages,
    fetch_and_extract,
    select_members,
    tile_images,
    wallpaper_key,
)
from infra.core.errors import UserError

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: test-wallpapers

Files: *
Copyright: 2024 Someone
License: CC-BY-SA-4.0

Files: usr/share/wallpapers/Drawn/*
Copyright: 2024 Someone Else
License: GPL-2+
"""


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def build_deb(tmp: Path, name: str = "test-wallpapers", version: str = "1.2-3") -> Path:
    root = tmp / "pkgroot"
    kde = root / "usr/share/wallpapers/Lake/contents"
    (kde / "images").mkdir(parents=True)
    _photo(64, 48, 0).save(kde / "images" / "640x480.jpg")
    _photo(192, 108, 1).save(kde / "images" / "1920x1080.jpg")  # the largest size of the wallpaper
    _photo(32, 24, 2).save(kde / "screenshot.png")
    (kde / "images_dark").mkdir()
    _photo(96, 54, 3).save(kde / "images_dark" / "1280x720.png")
    drawn = root / "usr/share/wallpapers/Drawn/contents/images"
    drawn.mkdir(parents=True)
    _photo(80, 60, 4).save(drawn / "800x600.png")
    flat = root / "usr/share/backgrounds/nature"
    flat.mkdir(parents=True)
    _photo(300, 200, 5).save(flat / "Fern.jpg")
    (flat / "README.txt").write_text("not an image\n")
    doc = root / f"usr/share/doc/{name}"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: test wallpapers\n"
    )
    deb = tmp / "debs" / f"{name}_{version}_all.deb"
    deb.parent.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


def test_extracts_largest_of_each_wallpaper_with_version_and_licences(tmp_path):
    deb = build_deb(tmp_path)
    spec = PackageSpec(name="test-wallpapers", include=["usr/share/wallpapers/Lake/*", "usr/share/backgrounds/*"])
    # the .deb is already in the folder: fetch_debs does not call apt-get
    infos = fetch_and_extract([spec], deb.parent, tmp_path / "images")
    info = infos[0]
    assert (info.name, info.version) == ("test-wallpapers", "1.2-3")
    assert info.licenses == ["CC-BY-SA-4.0", "GPL-2+"]
    names = sorted(Path(p).name for p in info.images)
    assert names == ["Fern.jpg", "Lake.jpg", "Lake_dark.png"]  # no screenshot, no Drawn, no text file
    lake = Image.open(tmp_path / "images" / "test-wallpapers" / "Lake.jpg")
    assert lake.size == (192, 108)  # the largest resolution was kept
    assert (tmp_path / "images" / "packages.json").is_file()


def test_select_members_groups_kde_resolutions_and_respects_excludes():
    members = [
        ("./usr/share/wallpapers/A/contents/images/640x480.jpg", 900_000),
        ("./usr/share/wallpapers/A/contents/images/5120x2880.jpg", 100),
        ("./usr/share/wallpapers/A/contents/screenshot.jpg", 5),
        ("./usr/share/backgrounds/x/B.png", 10),
        ("./usr/share/backgrounds/x/C.png", 10),
    ]
    got = select_members(members, PackageSpec("p", include=["usr/share/*"], exclude=["*/C.png"]))
    assert got == ["usr/share/backgrounds/x/B.png", "usr/share/wallpapers/A/contents/images/5120x2880.jpg"]
    assert wallpaper_key("usr/share/wallpapers/A/contents/images_dark/1x1.png") == "usr/share/wallpapers/A:dark"


def test_tiles_cover_each_scale_without_upscaling(tmp_path):
    src = tmp_path / "p" / "photo.png"
    src.parent.mkdir()
    _photo(400, 200, 7).save(src)
    tiles = tile_images([str(src)], tmp_path / "tiles", short_sides=[100, 200, 400], tile=50)
    # short side 100 -> 200x100 -> 4x2 tiles; 200 -> native 400x200 -> 8x4; 400 would upscale: skipped
    assert len(tiles) == 8 + 32
    assert all(Image.open(t).size == (50, 50) for t in tiles)
    native = Image.open(tmp_path / "tiles" / "p__photo__s200_00_00.png")
    assert np.array_equal(np.asarray(native), np.asarray(Image.open(src))[:50, :50])


def test_held_out_packages_are_refused_for_training():
    check_training_packages([PackageSpec("mate-backgrounds")])
    for name in ("lomiri-wallpapers-16.04", "ukui-wallpapers"):
        with pytest.raises(UserError, match="held out"):
            check_training_packages([PackageSpec("mate-backgrounds"), PackageSpec(name)])
