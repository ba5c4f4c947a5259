"""VARSR data pipeline: raw images -> scored, selected, degraded WebDataset shards (Ray), and the training reader.

Python API (stable names other components rely on):

    data_pipeline.build(input, output, config=None, ray_address=None) -> dict
        score -> select -> shard; resumable (completed shards are kept, the rest written); returns the summary
        (inputs, kept, rejected, failed, *_by_reason, samples, negatives, classes, shards, bytes, seconds, ...).
        `config`: None (defaults), a YAML path, a preset name in configs/data/, or a BuildConfig.
    data_pipeline.score(input, output, config=None, ray_address=None) -> dict       # scores.parquet
    data_pipeline.select(scores_path, output, config=None) -> dict                 # selection/rejected.parquet
    data_pipeline.shard(selection_path, output, config=None, ray_address=None) -> dict
    data_pipeline.load_build_config(path_or_preset_or_none, overrides=()) -> BuildConfig   # "a.b=1" overrides
    data_pipeline.reader.make_dataset(urls_or_dir, batch_size=None, *, shuffle=1000, resampled=False,
        epoch_samples=None, seed=0, lr_size=None, hr_size=None, lr_upsample="pil_bicubic", crop="random",
        world_size=None, rank=None, num_workers=None, keep_lr_lowres=False, keep_meta=False)
        -> webdataset.DataPipeline yielding {"hr": (3,H,W) float [0,1], "lr": (3,H,W) float [0,1] (re-upsampled),
           "label": int 0/1, "class_id": int, "key": str} (collated batches when batch_size is given)
    data_pipeline.reader.make_loader(urls_or_dir, batch_size, num_workers=2, **kw) -> torch DataLoader
    data_pipeline.sample_corpus.write_sample_corpus(dir, with_bad_files=True) -> {name: {"kind", "expect"}}
    data_pipeline.degrade.degrade(hr_uint8, DegradationConfig, seed) -> (lr_uint8, params)
    data_pipeline.degrade.apply_degradation(hr_uint8, params) -> lr_uint8   # reproduces a sample's LR

Shards (DESIGN.md contract): `{prefix}-{000000}.tar` with `{key}.hr.png`, `{key}.lr.png` (HR/scale),
`{key}.json` (key, source_uri, sha256, original_size, label, class_id, scores, crop, hr_size, lr_size, scale,
variant, degradation{preset, params incl. seed}, source_meta, pipeline_version, config_hash); next to them
`{prefix}-{000000}.stats.json`, `manifest.json`, `rejected.parquet`, `scores.parquet`, `selection.parquet`.
CLI: `varsr data {score,select,shard,build,inspect,verify}` (infra/cli.py registers them).
"""
from .config import BuildConfig, load_build_config, save_config
from .jobs import build, score, select, shard

__all__ = ["BuildConfig", "build", "load_build_config", "save_config", "score", "select", "shard"]
