"""Writes are all or nothing, on local disk and on a real S3 endpoint (moto on 127.0.0.1)."""

import pytest

from optical_ray import storage


def write_then_fail(uri: str) -> None:
    fs, path = storage.resolve(uri)
    storage._makedirs(fs, path)
    with pytest.raises(RuntimeError, match="injected"), storage._atomic_output(fs, path, uri) as out:
        out.write(b"half of a file" * 100_000)  # 1.4 MB: a multipart upload on S3
        raise RuntimeError("injected failure mid-upload")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_that_fails_midway_leaves_no_visible_object(where, s3, tmp_path):
    base = f"s3://{s3['bucket']}/atomic" if where == "s3" else str(tmp_path / "atomic")
    target = storage.join(base, "index.faiss")
    write_then_fail(target)
    assert not storage.exists(target)
    assert storage.list_files(base) == [] if storage.exists(base) else True  # no partial left behind either
    storage.write_bytes(b"complete", target)
    assert storage.read_bytes(target) == b"complete" and storage.list_files(base) == [target]


def test_one_s3_filesystem_serves_every_read_until_the_aws_settings_change(s3, monkeypatch):
    """A filesystem owns its connection pool: training reads a row group at a time, each through the same one."""
    uri = f"s3://{s3['bucket']}/reuse/part.bin"
    storage.write_bytes(b"x", uri)
    first = storage.resolve(uri)[0]
    assert storage.read_bytes(uri) == b"x" and storage.resolve(uri)[0] is first
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert storage.resolve(uri)[0] is not first  # new credentials: a new filesystem, which the SDK reads them into
