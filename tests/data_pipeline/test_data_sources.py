"""Sources, safe decoding of every bad-file kind, scorers, dedup, negatives, classes (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import skimage.data

from data_pipeline.cluster import cap_per_class, kmeans_classes
from data_pipeline.config import SourceConfig
from data_pipeline.decode import decode_image
from data_pipeline.dedup import exact_duplicates, hamming, near_duplicates
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.scorers import blockiness, builtin_embed, builtin_scores, noise_sigma, phash
from data_pipeline.selection import negative_mask
from data_pipeline.sources import list_sources


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return d, write_sample_corpus(d)


def test_every_file_decodes_or_has_its_reason(corpus):
    d, info = corpus
    kinds = {v["expect"] for v in info.values()}
    assert {
        "rejected:empty_file",
        "rejected:not_an_image",
        "rejected:decompression_bomb",
        "rejected:too_small",
        "failed:truncated",
    } <= kinds
    for name, v in info.items():
        r = decode_image((d / name).read_bytes())
        got = "ok" if r.status == "ok" else f"{r.status}:{r.reason}"
        assert got == v["expect"], (name, r.error)
        if r.status == "ok":
            assert r.image.dtype == np.uint8 and r.image.ndim == 3 and r.image.shape[2] == 3
        else:
            assert r.error


def test_modes_are_converted_correctly(corpus):
    d, _ = corpus
    img = lambda n: decode_image((d / n).read_bytes()).image  # noqa: E731
    chelsea = skimage.data.chelsea()
    rot = img("modes/chelsea_exif_rot6.jpg")
    assert rot.shape == chelsea.shape  # EXIF orientation applied
    assert np.abs(rot.astype(int) - chelsea).mean() < 6
    moon = img("modes/moon_16bit.png")  # 16-bit -> 8-bit, not clipped
    assert np.abs(moon[..., 0].astype(int) - skimage.data.moon()).max() <= 1
    rgba = img("modes/rocket_RGBA.png")  # alpha over white background
    yy, xx = np.indices(rgba.shape[:2])
    outside = (yy - 213) ** 2 + (xx - 320) ** 2 >= 200**2
    assert (rgba[outside] == 255).all()
    np.testing.assert_array_equal(rgba[213, 320], skimage.data.rocket()[213, 320])
    grass = img("modes/grass_P_transparency.png")
    assert grass.shape == (512, 512, 3)
    gif = img("modes/colorwheel_animated.gif")
    assert gif.shape == skimage.data.colorwheel().shape
    cmyk = img("modes/gravel_CMYK.jpg")
    assert np.abs(cmyk[..., 0].astype(int) - skimage.data.gravel()).mean() < 12


def test_sources_folder_glob_manifest_and_fsspec(corpus, tmp_path):
    d, info = corpus
    items = list_sources(d)
    assert len(items) == len(info) and [i.uri for i in items] == sorted(i.uri for i in items)
    assert len(list_sources(str(d / "photos" / "*.jpg"))) == sum(
        n.startswith("photos/") and n.endswith(".jpg") for n in info
    )
    assert len(list_sources(f"file://{d}/modes")) == sum(n.startswith("modes/") for n in info)
    rows = [{"path": f"photos/{n}", "caption": f"c{i}"} for i, n in enumerate(["coffee.jpg", "rocket.jpg"])]
    (d / "m.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).rename(columns={"path": "url"}).to_parquet(d / "m.parquet")
    for m in ("m.csv", "m.jsonl", "m.parquet"):
        its = list_sources(str(d / m))
        assert [i.uri.rsplit("/", 1)[1] for i in its] == ["coffee.jpg", "rocket.jpg"]
        assert its[0].meta == {"caption": "c0"}
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.png", (d / "photos/astronaut.png").read_bytes())
    fs.pipe("/corpus/sub/b.jpg", (d / "photos/coffee.jpg").read_bytes())
    assert [i.uri for i in list_sources("memory://corpus")] == ["memory:///corpus/a.png", "memory:///corpus/sub/b.jpg"]
    with pytest.raises(FileNotFoundError):
        list_sources(str(tmp_path / "nope"))
    assert len(list_sources(d, SourceConfig(all_files=True))) >= len(info) + 3


def test_scorers_respond_to_blur_noise_and_jpeg():
    img = skimage.data.astronaut()
    import cv2

    base = builtin_scores(img)
    blurred = builtin_scores(cv2.GaussianBlur(img, (0, 0), 3))
    assert blurred["sharpness"] < 0.2 * base["sharpness"] and blurred["quality"] < base["quality"]
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    flat = np.full((256, 256), 128, np.float32)
    assert noise_sigma(flat) == 0.0
    assert noise_sigma(cv2.cvtColor(noisy, cv2.COLOR_RGB2GRAY).astype(np.float32)) > base["noise"] + 4
    _, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 8])
    jpg = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    assert blockiness(cv2.cvtColor(jpg, cv2.COLOR_BGR2GRAY).astype(np.float32)) > base["blockiness"] + 0.3
    assert builtin_scores(np.full((64, 64, 3), 90, np.uint8))["flatness"] == 1.0
    e = builtin_embed(img)
    assert e.shape == (248,) and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)


def test_dedup_exact_and_near():
    assert exact_duplicates(["a", "b", "a", "c", "b"]).tolist() == [False, False, True, False, True]
    img = skimage.data.astronaut()
    import cv2

    g = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32)  # noqa: E731
    _, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
    h1, h2 = phash(g(img)), phash(g(cv2.imdecode(enc, cv2.IMREAD_COLOR)))
    h3 = phash(g(skimage.data.coffee()))
    assert hamming(h1, h2) <= 4 < hamming(h1, h3)
    assert near_duplicates([h1, h3, h2], 4).tolist() == [False, False, True]
    rng = np.random.default_rng(0)
    hashes = [int(np.int64(np.uint64(x))) for x in rng.integers(0, 2**63, 300, dtype=np.uint64)]
    flip = lambda h, bits: h ^ sum(1 << b for b in bits)  # noqa: E731
    hashes.append(flip(hashes[5], [0, 17, 40, 63]))  # distance 4 from #5
    hashes.append(flip(hashes[6], [1, 2, 3, 4, 5]))  # distance 5 from #6
    m = near_duplicates(hashes, 4)
    brute = [any(hamming(hashes[i], hashes[j]) <= 4 for j in range(i) if not m[j]) for i in range(len(hashes))]
    assert m.tolist() == brute and m[300] and not m[301]


def test_negative_rules():
    s = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    # minmax: s < min + f * max = 1 + 0.4 * 10 = 5
    assert negative_mask(s, "minmax", 0.4, 0, 1.0).tolist() == [True, True, True, True, False]
    assert negative_mask(s, "minmax", 0.4, 0, 0.4).tolist() == [True, True, False, False, False]
    assert negative_mask(s, "percentile", 0, 40, 1.0).tolist() == [True, True, False, False, False]
    assert not negative_mask(s, "none", 0, 0, 1.0).any()


def test_kmeans_classes_and_cap():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    emb = np.concatenate([c + rng.normal(size=(20, 8)) for c in centres])
    ids = kmeans_classes(emb, 3, seed=0)
    assert ids[0] == 0 and sorted(set(ids.tolist())) == [0, 1, 2]
    assert all(len(set(ids[i * 20 : (i + 1) * 20].tolist())) == 1 for i in range(3))
    assert kmeans_classes(emb[:2], 10, 0).tolist() == [0, 1]
    over = cap_per_class(np.array([0, 0, 0, 1]), np.array([1.0, 3.0, 2.0, 0.0]), 2)
    assert over.tolist() == [True, False, False, False]
