"""The shard contract's one owner: the format (``format.py``), the writer (``writer.py``) and the reader
(``reader.py``) that the data jobs, training, evaluation and the tests all use. See ``format.py`` for the layout."""
from .format import (MANIFEST, REJECTED, SAMPLE_MEMBERS, SCORES, SELECTION, TOKEN_MEMBERS, Counts, Manifest,
                     SampleMeta, ShardEntry, ShardFailure, ShardStats, TokenCache, TokenShardStats, decode_png,
                     decode_token_members, encode_png, encode_token_members, is_token_shard, read_manifest,
                     read_stats, read_token_stats, shard_name, stats_name, token_shard_name, token_stats_name,
                     write_manifest)
from .reader import (BatchStream, DataPosition, ShardSet, ShardStream, collate, decode_hr, decode_sample, eval_pairs,
                     iter_tar, iter_tar_stream, peek_hr_size, resolve_shards, upsample_lr)
from .writer import TarWriter, publish_shard, publish_with_stats, remove_stale_temporaries

__all__ = [
    "MANIFEST", "REJECTED", "SAMPLE_MEMBERS", "SCORES", "SELECTION", "TOKEN_MEMBERS", "Counts", "Manifest",
    "SampleMeta", "ShardEntry", "ShardFailure", "ShardStats", "TokenCache", "TokenShardStats", "decode_png",
    "decode_token_members", "encode_png", "encode_token_members", "is_token_shard", "read_manifest", "read_stats",
    "read_token_stats", "shard_name", "stats_name", "token_shard_name", "token_stats_name", "write_manifest",
    "BatchStream", "DataPosition", "ShardSet", "ShardStream", "collate", "decode_hr", "decode_sample", "eval_pairs",
    "iter_tar", "iter_tar_stream", "peek_hr_size", "resolve_shards", "upsample_lr", "TarWriter", "publish_shard",
    "publish_with_stats", "remove_stale_temporaries",
]
