"""VARSR data pipeline: raw images -> scored, selected, degraded WebDataset shards (Ray), and the one shard reader.

Python API (every location is a local path or an fsspec URL such as ``s3://bucket/prefix``):

    data_pipeline.build(input, output, config=None, ray_address=None) -> dict
        score -> select -> shard; resumable (intact shards are kept, the rest written); returns the summary
        (inputs, kept, rejected, failed, *_by_reason, samples, negatives, classes, shards, bytes, seconds, ...).
        ``config``: None (defaults), a YAML path, a preset name in configs/data/, or a BuildConfig.
    data_pipeline.score(input, output, config=None, ray_address=None) -> dict       # scores.parquet
    data_pipeline.select(scores_url, output, config=None) -> dict                  # selection/rejected.parquet
    data_pipeline.shard(selection_url, output, config=None, ray_address=None) -> dict
    data_pipeline.load_build_config(path_or_preset_or_none, overrides=()) -> BuildConfig   # "a.b=1" overrides
    data_pipeline.shards            the shard contract: typed Manifest / SampleMeta / ShardStats, the writer, and
                                    the reader (resolve_shards, ShardStream, BatchStream, eval_pairs)
    data_pipeline.sample_corpus.write_sample_corpus(dir, with_bad_files=True) -> {name: {"kind", "expect"}}
    data_pipeline.degrade.degrade(hr_uint8, DegradationConfig, seed) -> (lr_uint8, params)
    data_pipeline.degrade.apply_degradation(hr_uint8, params) -> lr_uint8   # reproduces a sample's LR

CLI: ``varsr data {score,select,shard,build,inspect,verify}`` (infra/cli.py registers them). The job functions are
loaded on first use, so the training reader (``data_pipeline.shards``) does not import Ray or pandas.
"""

from __future__ import annotations

from .config import BuildConfig, load_build_config, save_config

_JOBS = ("build", "score", "select", "shard")
__all__ = ["BuildConfig", "build", "load_build_config", "save_config", "score", "select", "shard"]


def __getattr__(name: str):
    if name in _JOBS:
        from . import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
