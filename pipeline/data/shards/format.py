"""One shard = one WebDataset tar whose samples are BLOCKS of images stored as packed arrays.

Why blocks and not one member per image: stock per-image WebDataset decoding runs at ~5k images/s per process;
a block of a few hundred images is one .npy member read without copying (pipeline.data.shards.tar_index), so
decoding costs nothing per image. Why images and not pre-built episodes: training episodes are re-drawn every
epoch (pipeline.data.shards.plan), so the shards hold images; evaluation splits are stored in their fixed-episode
order, so there an episode is simply T consecutive images.

Each block is a WebDataset sample keyed "<split>_<shard:05d>_<block:04d>" with members
    images.npy       uint8 [n, C, H, W]                      8-bit data
    images.bits.npy  uint8 [n, C, H, ceil(W / 8)]            binary data: np.packbits(images, axis=-1), 8x smaller;
                                                             unpack with np.unpackbits(a, axis=-1, count=W)
    keys.npy         int64 [n]   the images' indices in the split (the sample keys the reader reports)
    labels.npy       int64 [n]   only when the dataset has labels
With prepare's compress option the image member is gzipped (images.npy.gz / images.bits.npy.gz): about 4x fewer
bytes for 8-bit MNIST-like data, for ~200k images/s of decompression per process; worth it on a slow store.
Any WebDataset reader can open these tars (`wds.WebDataset(url).decode()` yields the arrays per block).
Tar headers are fixed (mtime 0, uid 0, mode 0444) so the same content always gives the same bytes and sha256;
that is what lets a re-run of prepare recognise a shard it already wrote.
"""
from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.data.shards.tar_index import TarIndexError, npy_from_view, tar_members


class ShardFormatError(ValueError):
    """A shard's bytes are not a well-formed block tar; the message names the shard."""


@dataclass(frozen=True)
class ShardArrays:
    images: np.ndarray         # uint8 [n, C, H, W]
    keys: np.ndarray           # int64 [n]
    labels: np.ndarray | None  # int64 [n] or None


def block_key(split: str, shard_index: int, block_index: int) -> str:
    return f"{split}_{shard_index:05d}_{block_index:04d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _gzip(data: bytes) -> bytes:
    # Level 1: most of the size gain of level 6 on image data at twice the speed; mtime 0 keeps bytes reproducible.
    return gzip.compress(data, compresslevel=1, mtime=0)


def encode_shard(split: str, shard_index: int, arrays: ShardArrays, block_size: int, bit_depth: int,
                 compress: bool = False) -> bytes:
    """The tar bytes of one shard, deterministic for given content; binary images are bit-packed, and with
    `compress` the image members are gzipped ("images.npy.gz", which stock WebDataset also decodes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for block_index, start in enumerate(range(0, arrays.images.shape[0], block_size)):
            key = block_key(split, shard_index, block_index)
            rows = slice(start, start + block_size)
            if bit_depth == 1:
                name, payload = "images.bits.npy", _npy_bytes(np.packbits(arrays.images[rows], axis=-1))
            else:
                name, payload = "images.npy", _npy_bytes(arrays.images[rows])
            if compress:
                name, payload = name + ".gz", _gzip(payload)
            _add_member(tar, f"{key}.{name}", payload)
            _add_member(tar, f"{key}.keys.npy", _npy_bytes(arrays.keys[rows].astype(np.int64)))
            if arrays.labels is not None:
                _add_member(tar, f"{key}.labels.npy", _npy_bytes(arrays.labels[rows].astype(np.int64)))
    return buffer.getvalue()


def _gunzip(view: memoryview, where: str) -> bytes:
    try:
        return zlib.decompress(view, wbits=31)  # 31: gzip container
    except zlib.error as err:
        raise ShardFormatError(f"{where}: corrupt gzip member ({err})") from err


def decode_shard(data: bytes, name: str, image_shape: tuple[int, int, int]) -> ShardArrays:
    """All blocks of one shard concatenated in block order (one copy per array, nothing per image)."""
    blocks: dict[str, dict[str, np.ndarray]] = {}
    try:
        for member, view in tar_members(data, name):
            base, _, ext = member.partition(".")
            if ext.endswith(".gz"):
                ext, view = ext[: -len(".gz")], memoryview(_gunzip(view, f"{name}:{member}"))
            blocks.setdefault(base, {})[ext] = npy_from_view(view, f"{name}:{member}")
    except TarIndexError as err:
        raise ShardFormatError(str(err)) from err
    if not blocks:
        raise ShardFormatError(f"{name}: no blocks in shard")
    ordered = [blocks[key] for key in sorted(blocks)]
    image_ext = "images.bits.npy" if "images.bits.npy" in ordered[0] else "images.npy"
    for key in sorted(blocks):
        if image_ext not in blocks[key] or "keys.npy" not in blocks[key]:
            raise ShardFormatError(f"{name}: block {key} lacks {image_ext} or keys.npy (has {sorted(blocks[key])})")
    images = np.concatenate([b[image_ext] for b in ordered])
    if image_ext == "images.bits.npy":
        images = np.unpackbits(images, axis=-1, count=image_shape[-1])
    if images.shape[1:] != tuple(image_shape):
        raise ShardFormatError(f"{name}: images of shape {images.shape[1:]}, dataset card says {tuple(image_shape)}")
    keys = np.concatenate([b["keys.npy"] for b in ordered])
    if keys.shape[0] != images.shape[0]:
        raise ShardFormatError(f"{name}: {keys.shape[0]} keys for {images.shape[0]} images")
    has_labels = "labels.npy" in ordered[0]
    return ShardArrays(images, keys, np.concatenate([b["labels.npy"] for b in ordered]) if has_labels else None)
