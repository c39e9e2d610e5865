"""The one filesystem factory for every URL the pipeline reads or writes: source files, shards, manifests, cards.

One filesystem per process, bounded timeouts, no retries below pipeline.retry (the one retry layer).

Filesystems are built lazily INSIDE each process (keyed by pid) and never shared across fork: s3fs runs an
asyncio loop on a thread, which a forked DataLoader worker would inherit half-dead and hang on (s3fs #914,
fsspec #755). `skip_instance_cache=True` stops fsspec from handing a child the parent's instance.

S3 settings come from the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which s3fs/botocore read themselves, or from `storage_options`
(e.g. {"endpoint_url": ..., "key": ..., "secret": ...}). Storage options are never logged or written out.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import fsspec

log = logging.getLogger(__name__)

# Bounded timeouts so a dead connection fails instead of hanging for botocore's 60 s, and no silent retries
# below us: botocore's attempts times s3fs's two nested retry loops made how long an outage was ridden out
# depend on timing inside three libraries. RetryPolicy is the one retry layer: logged, configurable, and the
# same for every store.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"total_max_attempts": 1}}
}
S3FS_CALL_RETRIES = 1

_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def split_url(url: str) -> tuple[str, str]:
    """(protocol, path inside the filesystem) of a local path or fsspec URL."""
    protocol, path = fsspec.core.split_protocol(str(url))
    protocol = protocol or "file"
    if protocol == "file":
        path = os.path.abspath(path)
    return protocol, path.rstrip("/")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """This process's filesystem for `url` and the path inside it."""
    protocol, path = split_url(url)
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        options = {**S3_DEFAULTS, **options}
    if protocol == "file":
        options.setdefault("auto_mkdir", True)  # object stores have no directories; make local paths behave alike
    # botocore reads the AWS_* variables when the filesystem is built: a process whose environment changed (a
    # driver pointed at another endpoint) must not be handed the filesystem of the old one
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))) if protocol != "file" else ()
    cache_key = (os.getpid(), protocol, _freeze(options), aws_env)
    fs = _FILESYSTEMS.get(cache_key)
    if fs is None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if protocol in ("s3", "s3a"):
            fs.retries = S3FS_CALL_RETRIES
        _FILESYSTEMS[cache_key] = fs
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def unstrip_protocol(url: str, path: str) -> str:
    """The full URL of `path` on the same filesystem as `url` (what the manifest records)."""
    protocol, _ = split_url(url)
    return path if protocol == "file" else f"{protocol}://{path}"
