"""The loopback service fixtures (tests/services.py) are the real things: s3fs and boto3 talk to moto's S3 server
through the environment alone, the strict server refuses credentials, and PostgreSQL accepts the role whose password
holds '@', ':' and '/' only when the URL encodes it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_s3_env_lets_s3fs_and_boto3_reach_moto_by_environment_only(s3_bucket, s3_env):
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem()  # no arguments: endpoint and credentials come from AWS_* variables
    with fs.open(f"{s3_bucket}/dir/a.bin", "wb") as f:
        f.write(b"\x00varsr" * 1000)
    assert fs.cat(f"s3://{s3_bucket}/dir/a.bin") == b"\x00varsr" * 1000
    assert s3_env.list_keys(s3_bucket) == ["dir/a.bin"]
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="dir/a.bin")["Body"].read()
    assert body == b"\x00varsr" * 1000


def test_each_s3_bucket_is_fresh(s3_server):
    a, b = s3_server.create_bucket(), s3_server.create_bucket()
    assert a != b and s3_server.list_keys(a) == [] and s3_server.list_keys(b) == []


def test_strict_s3_server_refuses_credentials(s3_server_strict):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as e:
        s3_server_strict.client().create_bucket(Bucket="varsr-refused")
    assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"


def test_postgres_role_logs_in_with_encoded_url_only(postgres_server):
    import psycopg
    import sqlalchemy

    assert {"@", ":", "/"} <= set(postgres_server.password)
    engine = sqlalchemy.create_engine(postgres_server.url())
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_user, current_database()")).one() == ("varsr", "varsr")
    finally:
        engine.dispose()
    # pasted raw, the same password breaks the URL: it no longer names this user, password and host
    raw = (
        f"postgresql+psycopg://{postgres_server.user}:{postgres_server.password}"
        f"@{postgres_server.host}:{postgres_server.port}/{postgres_server.dbname}"
    )
    try:
        parsed = sqlalchemy.engine.make_url(raw)
        assert (parsed.username, parsed.password, parsed.host) != (
            postgres_server.user,
            postgres_server.password,
            postgres_server.host,
        )
    except (ValueError, sqlalchemy.exc.ArgumentError):
        pass
    # and a wrong password is refused by the server (the role really requires it)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=postgres_server.host,
            port=postgres_server.port,
            user=postgres_server.user,
            password="not-" + postgres_server.password,
            dbname=postgres_server.dbname,
            connect_timeout=5,
        ).close()


def test_postgres_create_database_is_owned_by_the_role(postgres_server):
    name = postgres_server.create_database()
    with postgres_server.connect(name) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (7)")
        assert conn.execute("SELECT x FROM t").fetchone() == (7,)


def test_ensure_postgres_finds_debian_layout_and_names_the_install_step(tmp_path):
    """infra/scripts/ensure_postgres.sh (run by test.sh): quiet success when the server binaries exist in Debian's
    versioned folder; where it cannot install (no apt-get), one line that names the package to install."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "id", "mktemp", "rm", "tail", "basename", "dirname"):
        (tools / tool).symlink_to(shutil.which(tool))
    script = str(ROOT / "infra/scripts/ensure_postgres.sh")
    debian = tmp_path / "lib/postgresql/15/bin"
    debian.mkdir(parents=True)
    (debian / "pg_ctl").write_text("")
    found = subprocess.run(
        ["bash", script],
        env={"PATH": str(tools), "PG_LIB_DIR": str(tmp_path / "lib/postgresql")},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0 and found.stdout == found.stderr == ""
    missing = subprocess.run(
        ["bash", script], env={"PATH": str(tools), "PG_LIB_DIR": str(tmp_path / "none")}, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "apt-get install -y postgresql" in missing.stderr
