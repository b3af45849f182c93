"""Local paths and ``s3://bucket/key`` URIs behind one interface (pyarrow filesystems).

S3 settings come from the standard AWS configuration, never from code: credentials from the AWS
chain (environment, profile, instance role), the endpoint of an S3-compatible store from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. Retries are the SDK's (``retry_strategy``), not ours.
"""

from __future__ import annotations

import functools
import io
import os
import uuid
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """A URI could not be read or written; the message names the URI."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


# What keys the cached filesystem besides endpoint and region: new credentials, a new filesystem.
_CREDENTIAL_VARIABLES = ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem of the current AWS settings, one per process and setting: a filesystem owns
    its connection pool, so a new one per call would open a connection (a TLS handshake on AWS) for
    every read, and training reads a row group at a time."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(s3_endpoint(), region, tuple(os.environ.get(name) for name in _CREDENTIAL_VARIABLES))


@functools.cache
def _s3_filesystem(endpoint: str | None, region: str | None, credentials: tuple) -> pafs.S3FileSystem:
    """``credentials`` is not passed on: the AWS SDK reads them itself, from its chain."""
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def delete(uri: str) -> None:
    """Remove a file; a missing one is not an error."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"{uri}: cannot delete ({err})") from err


def list_files(uri: str, suffix: str = "") -> list[str]:
    """The files under a folder URI (recursively) ending in ``suffix``, or [uri] if it is a file."""
    fs, path = resolve(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(_not_found(fs, path, uri))
    if info.type == pafs.FileType.File:
        return [str(uri)]
    prefix = "s3://" if is_s3(uri) else ""
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(prefix + f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(suffix))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, or only its ``columns`` (the others are not read)."""
    fs, path = resolve(uri)
    if _info(fs, path, uri).type == pafs.FileType.NotFound:
        raise StorageError(_not_found(fs, path, uri))
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{uri}: not a readable Parquet file ({err})") from err


def read_parquet_schema(uri: str) -> pa.Schema:
    """The schema from a Parquet file's footer (reads only the footer)."""
    return parquet_footer(uri).schema.to_arrow_schema()


def parquet_rows(uri: str) -> int:
    """The row count from a Parquet file's footer (reads only the footer)."""
    return parquet_footer(uri).num_rows


def parquet_footer(uri: str) -> pq.FileMetaData:
    """A Parquet file's footer: schema, row groups and their row counts (reads only the footer)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except FileNotFoundError as err:
        raise StorageError(_not_found(fs, path, uri)) from err
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{uri}: not a readable Parquet file ({err})") from err


def read_row_group(uri: str, index: int, columns: list[str], footer: pq.FileMetaData) -> pa.Table:
    """Row group ``index`` of a Parquet file, only its ``columns``. ``footer`` (:func:`parquet_footer`)
    is passed in so that reading many row groups of one file reads its footer once, not once each."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f, metadata=footer).read_row_group(index, columns=columns)
    except FileNotFoundError as err:
        raise StorageError(_not_found(fs, path, uri)) from err
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{uri}: row group {index} not readable ({err})") from err


def size(uri: str) -> int:
    """Bytes in a file."""
    fs, path = resolve(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(_not_found(fs, path, uri))
    return info.size


def write_parquet(table: pa.Table, uri: str) -> None:
    fs, path = resolve(uri)
    _makedirs(fs, path)
    with _atomic_output(fs, path, uri) as out:
        pq.write_table(table, out, compression="zstd")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file") from err
    except OSError as err:
        raise StorageError(f"{uri}: cannot read ({err})") from err


def write_bytes(data: bytes, uri: str) -> None:
    fs, path = resolve(uri)
    _makedirs(fs, path)
    with _atomic_output(fs, path, uri) as out:
        out.write(data)


def copy_dir(source: str, target: str) -> None:
    """Copy a folder between any two of local paths and s3:// URIs."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(target)
    try:
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as err:
        raise StorageError(f"cannot copy {source} to {target} ({err})") from err


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as err:  # unreachable endpoint, missing bucket, bad credentials
        raise StorageError(f"{uri}: cannot reach ({err})") from err


def _not_found(fs: pafs.FileSystem, path: str, uri: str) -> str:
    bucket = path.split("/", 1)[0]
    if is_s3(uri) and _info(fs, bucket, uri).type == pafs.FileType.NotFound:
        return f"{uri}: bucket {bucket!r} does not exist"
    return f"{uri}: no such file or folder"


def _makedirs(fs: pafs.FileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent:
        try:
            fs.create_dir(parent, recursive=True)
        except OSError as err:
            raise StorageError(f"{parent}: cannot create folder ({err})") from err


class _atomic_output:
    """Write to ``path`` through a temporary name that becomes ``path`` only when the write succeeded
    (local: a rename; S3: a server-side copy, since closing an S3 stream -- also during an exception --
    completes its upload). A failed write leaves nothing at ``path`` and removes the temporary."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path, uri
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.tmp = f"{path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> io.RawIOBase:
        try:
            self.stream = self.fs.open_output_stream(self.tmp)
        except OSError as err:
            raise StorageError(f"{self.uri}: cannot write ({err})") from err
        return self.stream

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stream.close()
        except OSError as err:
            if exc_type is None:
                self._discard()
                raise StorageError(f"{self.uri}: cannot write ({err})") from err
        if exc_type is not None:
            self._discard()
            return
        try:
            if self.local:
                os.replace(self.tmp, self.path)
            else:
                self.fs.move(self.tmp, self.path)
        except OSError as err:
            self._discard()
            raise StorageError(f"{self.uri}: cannot write ({err})") from err

    def _discard(self) -> None:
        try:
            self.fs.delete_file(self.tmp)
        except OSError:
            pass  # never created, or already gone
