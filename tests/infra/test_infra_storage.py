"""The storage layer (infra/core/storage.py) against a real S3-compatible endpoint on loopback (moto's server):
atomic writes, listing, streaming reads, and one-line errors naming the URL for a missing bucket, refused
credentials and an endpoint that is down — in seconds, not after minutes of retries."""

from __future__ import annotations

import pytest

from infra.core import storage
from infra.core.net import free_port


def test_round_trip_on_s3(s3_bucket):
    base = f"s3://{s3_bucket}/prefix"
    storage.makedirs(base)  # checks that the bucket exists
    storage.write_bytes(storage.join(base, "a", "x.bin"), b"hello")
    storage.write_text(storage.join(base, "b.txt"), "world")
    assert storage.exists(storage.join(base, "a", "x.bin")) and storage.size(storage.join(base, "b.txt")) == 5
    assert storage.listdir(base) == ["a", "b.txt"] and storage.listdir(storage.join(base, "none")) == []
    with storage.open_url(storage.join(base, "a", "x.bin")) as f:
        assert f.read(3) == b"hel"
    import hashlib

    assert storage.sha256(storage.join(base, "b.txt")) == hashlib.sha256(b"world").hexdigest()
    storage.remove(storage.join(base, "a"), recursive=True)
    assert storage.listdir(base) == ["b.txt"]


def test_trees_and_files_between_local_and_s3(s3_bucket, tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / "src" / "c.json").write_text("{}")
    url = f"s3://{s3_bucket}/tree"
    storage.put_tree(tmp_path / "src", url)
    storage.get_tree(url, tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "w.bin").read_bytes() == b"\x00" * 1000
    assert (tmp_path / "back" / "c.json").read_text() == "{}"
    assert (tmp_path / "src" / "c.json").exists()  # put_tree copies, it does not move


def test_local_writes_are_atomic_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "out" / "m.json"
    storage.write_bytes(str(target), b"1")
    storage.write_bytes(str(target), b"22")
    assert target.read_bytes() == b"22" and sorted(p.name for p in target.parent.iterdir()) == ["m.json"]


def test_missing_bucket_is_one_line_naming_the_url(s3_env):
    with pytest.raises(storage.StorageError) as ei:
        storage.makedirs("s3://no-such-bucket/shards")
    msg = str(ei.value)
    assert "s3://no-such-bucket/shards" in msg and "\n" not in msg
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/x.json"):
        storage.read_bytes("s3://no-such-bucket/x.json")


def test_refused_credentials_are_one_line(s3_server_strict, monkeypatch):
    from tests.services import _clear_s3fs_cache

    for k, v in s3_server_strict.env.items():
        monkeypatch.setenv(k, v)
    _clear_s3fs_cache()
    try:
        with pytest.raises(storage.StorageError) as ei:
            storage.write_bytes("s3://any-bucket/obj", b"x")
        assert "s3://any-bucket/obj" in str(ei.value) and "\n" not in str(ei.value)
        assert "refused" in str(ei.value) or "denied" in str(ei.value).lower()
    finally:
        _clear_s3fs_cache()


@pytest.mark.slow
def test_endpoint_down_fails_fast_with_one_line(monkeypatch):
    from tests.services import _clear_s3fs_cache

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    _clear_s3fs_cache()
    try:
        with pytest.raises(storage.StorageError) as ei:  # raised at all: the retries are bounded, not endless
            storage.exists("s3://bucket/manifest.json")
        assert "s3://bucket/manifest.json" in str(ei.value) and "endpoint" in str(ei.value)
        assert "\n" not in str(ei.value)
    finally:
        _clear_s3fs_cache()
