"""The shard contract's one owner: the format (``format.py``), the writer (``writer.py``) and the reader
(``reader.py``) that the data jobs, training, evaluation and the tests all use. See ``format.py`` for the layout."""
from .format import (MANIFEST, REJECTED, SAMPLE_MEMBERS, SCORES, SELECTION, Counts, Manifest, SampleMeta, ShardEntry,
                     ShardFailure, ShardStats, TokenCache, decode_png, encode_png, read_manifest, read_stats,
                     shard_name, stats_name, write_manifest)
from .reader import (BatchStream, DataPosition, ShardSet, ShardStream, collate, decode_sample, eval_pairs, iter_tar,
                     peek_hr_size, resolve_shards, upsample_lr)
from .writer import TarWriter, publish_shard, remove_stale_temporaries

__all__ = [
    "MANIFEST", "REJECTED", "SAMPLE_MEMBERS", "SCORES", "SELECTION", "Counts", "Manifest", "SampleMeta", "ShardEntry",
    "ShardFailure", "ShardStats", "TokenCache", "decode_png", "encode_png", "read_manifest", "read_stats",
    "shard_name", "stats_name", "write_manifest", "BatchStream", "DataPosition", "ShardSet", "ShardStream", "collate",
    "decode_sample", "eval_pairs", "iter_tar", "peek_hr_size", "resolve_shards", "upsample_lr", "TarWriter",
    "publish_shard", "remove_stale_temporaries",
]
