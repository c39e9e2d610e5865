"""Reading source files from a local path or any fsspec URL (file://, s3://, ...).

S3 settings come from the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which
s3fs honours, or from explicit storage_options.
"""
from __future__ import annotations

import gzip
import zlib
from typing import Any

import fsspec

from pipeline.data.sources.errors import SourceFormatError, SourceNotFoundError

GZIP_MAGIC = b"\x1f\x8b"


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or fsspec URL."""
    # a fresh instance: fsspec's cache would hand back one built under another AWS_* environment (endpoint)
    fs, path = fsspec.core.url_to_fs(str(url), skip_instance_cache=True, **(storage_options or {}))
    return fs, path.rstrip("/") if len(path) > 1 else path


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def require_dir(fs: fsspec.AbstractFileSystem, path: str, url: str, what: str) -> None:
    if not fs.isdir(path):
        raise SourceNotFoundError(f"{url}: source directory not found (expected {what})")


def find_file(fs: fsspec.AbstractFileSystem, base: str, names: list[str], url: str) -> str:
    """The first of `names` that exists under `base` (e.g. the .gz and the plain form of one file)."""
    for name in names:
        candidate = join(base, name)
        if fs.isfile(candidate):
            return candidate
    raise SourceNotFoundError(f"{url}: none of {names} found there")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name says)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError as err:
        raise SourceNotFoundError(f"{path}: file not found") from err
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise SourceFormatError(f"{path}: truncated or corrupt gzip stream ({err})") from err
    return raw
