"""Reading source files from a local path or any fsspec URL (file://, s3://, ...).

Filesystems come from pipeline.storage (one per process, fork-safe, bounded S3 timeouts) and reads go through
pipeline.retry, as the shards' do. S3 settings come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which s3fs honours, or from explicit storage_options.
"""
from __future__ import annotations

import gzip
import zlib

import fsspec

from pipeline.data.sources.errors import SourceFormatError, SourceNotFoundError
from pipeline.retry import with_retries

GZIP_MAGIC = b"\x1f\x8b"


def require_dir(fs: fsspec.AbstractFileSystem, path: str, url: str, what: str) -> None:
    if not with_retries(f"list {path}", lambda: fs.isdir(path)):
        raise SourceNotFoundError(f"{url}: source directory not found (expected {what})")


def find_file(fs: fsspec.AbstractFileSystem, base: str, names: list[str], url: str) -> str:
    """The first of `names` that exists under `base` (e.g. the .gz and the plain form of one file)."""
    for name in names:
        candidate = f"{base.rstrip('/')}/{name}"
        if with_retries(f"look for {candidate}", lambda: fs.isfile(candidate)):
            return candidate
    raise SourceNotFoundError(f"{url}: none of {names} found there")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name says)."""
    try:
        raw = with_retries(f"read {path}", lambda: fs.cat_file(path))
    except FileNotFoundError as err:
        raise SourceNotFoundError(f"{path}: file not found") from err
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise SourceFormatError(f"{path}: truncated or corrupt gzip stream ({err})") from err
    return raw
