"""``varsr eval --shards`` names its dataset by the manifest that the shard format locates (issue 31: one
shard-owned function, ``data_pipeline.shards.manifest_ref``, gives a dataset's manifest reference; inference does not
rebuild ``…/manifest.json`` itself). The roof wires that function into the eval command, and the evaluation's dataset
input carries the manifest's sha256 for a dataset folder and the pixels' hash for tars, which have no manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.shards import manifest_ref
from inference.evaluate import _data_input
from infra.cli import build_parser


def test_the_eval_command_gets_the_shard_formats_manifest_ref():
    args = build_parser().parse_args(["eval", "--shards", "some/dataset", "--checkpoint", "ckpt"])
    assert args.shard_manifest is manifest_ref
    assert args.shard_manifest("some/dataset") == manifest_ref("some/dataset") == "some/dataset/manifest.json"
    assert args.shard_manifest("some/dataset/shard-{000000..000003}.tar") is None


def test_a_dataset_folder_is_recorded_by_its_manifest_and_tars_by_their_pixels(tmp_path: Path):
    ds = tmp_path / "dataset"
    ds.mkdir()
    raw = json.dumps({"shards": []}).encode()
    (ds / "manifest.json").write_bytes(raw)
    out = tmp_path / "eval"
    out.mkdir()
    folder = _data_input({"shards": str(ds), "manifest": manifest_ref(str(ds))}, "f" * 64, out, 2)
    profile = json.loads(folder.dataset.profile)
    assert profile["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    assert folder.dataset.digest == hashlib.sha256(raw).hexdigest()[:36]
    tar = str(ds / "eval-000000.tar")
    tars = _data_input({"shards": tar, "manifest": manifest_ref(tar)}, "e" * 64, out, 2)
    assert "manifest_sha256" not in json.loads(tars.dataset.profile)
    assert tars.dataset.digest == ("e" * 64)[:36]
