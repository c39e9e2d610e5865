"""Fetching one shard: retries with backoff on transient store errors, then an integrity check against the
manifest (byte size always, sha256 when asked). Errors name the shard."""
from __future__ import annotations

import hashlib
from typing import Any, Literal

from pipeline.data.shards.manifest import ShardRecord
from pipeline.storage import filesystem, join
from pipeline.retry import RetryPolicy, with_retries

__all__ = ["RetryPolicy", "ShardIntegrityError", "ShardMissingError", "fetch_shard", "shard_url"]

Verify = Literal["size", "sha256"]


class ShardIntegrityError(ValueError):
    """A shard whose bytes do not match its manifest row (truncated, replaced, corrupt)."""


class ShardMissingError(FileNotFoundError):
    """A shard listed in the manifest that the store does not have."""


def shard_url(root: str, record: ShardRecord) -> str:
    return join(root.rstrip("/"), record.path)


def fetch_shard(root: str, record: ShardRecord, verify: Verify, retry: RetryPolicy,
                storage_options: dict[str, Any] | None = None) -> bytes:
    url = shard_url(root, record)
    fs, path = filesystem(url, storage_options)

    def read() -> bytes:
        # A ranged read of the manifest's size plus one byte: no HEAD request first (s3fs would send one to learn
        # the size), and a shard that grew is still noticed, by the extra byte.
        try:
            return fs.cat_file(path, start=0, end=record.num_bytes + 1)
        except FileNotFoundError as err:
            raise ShardMissingError(f"shard {url}: listed in the manifest but not found in the store") from err

    # One extra fetch on a mismatch: a transfer cut short can look like a short file; a second mismatch is real.
    for attempt in (1, 2):
        data = with_retries(f"shard {url}", read, retry)
        problem = None
        if len(data) != record.num_bytes:
            problem = (f"{len(data)}{'+' if len(data) > record.num_bytes else ''} bytes, manifest says "
                       f"{record.num_bytes} ({'truncated' if len(data) < record.num_bytes else 'replaced'})")
        elif verify == "sha256":
            digest = hashlib.sha256(data).hexdigest()
            if digest != record.sha256:
                problem = f"sha256 {digest[:16]}..., manifest says {record.sha256[:16]}... (corrupt)"
        if problem is None:
            return data
    raise ShardIntegrityError(f"shard {url}: {problem}")
