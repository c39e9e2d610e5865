"""MNIST and Fashion-MNIST from their original IDX files (gzipped or not).

IDX is big-endian: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one uint32 per
dimension, then the data. Images are magic 0x00000803 [count, rows, cols]; labels 0x00000801 [count].

Splits: the releases have 60,000 train and 10,000 test images. "valid" is the LAST 10,000 of the train file
and "train" the first 50,000, so the three splits are disjoint and fixed (the same sizes as binarized MNIST).
"""
from __future__ import annotations

import numpy as np

from pipeline.data.sources.errors import SourceFormatError
from pipeline.data.sources.files import find_file, read_bytes, require_dir
from pipeline.data.sources.image_set import ImageSet
from pipeline.storage import filesystem

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
IMAGE_SIZE = 28
NUM_VALID = 10_000

FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def parse_idx(data: bytes, path: str, magic: int) -> np.ndarray:
    """The uint8 array an IDX file holds, checked against its header; errors name `path`."""
    if len(data) < 4:
        raise SourceFormatError(f"{path}: {len(data)} bytes, too short for an IDX header (expected magic {magic:#010x})")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise SourceFormatError(f"{path}: IDX magic {found:#010x}, expected {magic:#010x}; not the claimed IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise SourceFormatError(f"{path}: truncated IDX header (expected {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise SourceFormatError(
            f"{path}: {len(data) - header} data bytes after the header, expected {expected} for dims {dims}"
            + (" (truncated file)" if len(data) - header < expected else " (trailing bytes)")
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_pair(source: str, file_split: str, storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels uint8 [N] of the 'train' or 'test' file pair under `source`."""
    fs, base = filesystem(source, storage_options)
    require_dir(fs, base, source, "the IDX files " + ", ".join(f"{s}[.gz]" for s in FILE_STEMS[file_split]))
    image_stem, label_stem = FILE_STEMS[file_split]
    image_path = find_file(fs, base, [image_stem + ".gz", image_stem], source)
    label_path = find_file(fs, base, [label_stem + ".gz", label_stem], source)
    images = parse_idx(read_bytes(fs, image_path), image_path, IMAGE_MAGIC)
    labels = parse_idx(read_bytes(fs, label_path), label_path, LABEL_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise SourceFormatError(f"{image_path}: images of shape {images.shape[1:]}, expected ({IMAGE_SIZE}, {IMAGE_SIZE})")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise SourceFormatError(
            f"{label_path}: {labels.shape[0]} labels, expected one per image of {image_path} ({images.shape[0]})"
        )
    if images.shape[0] == 0:
        raise SourceFormatError(f"{image_path}: no images (empty split)")
    return images, labels


# Seeds of the fixed Bernoulli binarization, one per split, so that the draws never depend on which splits load.
BINARIZE_SEEDS = {"train": 20_261_127, "valid": 20_261_128, "test": 20_261_129}


def load_idx_split(dataset: str, source: str, split: str, storage_options: dict | None = None,
                   binarize: bool = False) -> ImageSet:
    file_split = "test" if split == "test" else "train"
    images, labels = load_idx_pair(source, file_split, storage_options)
    if split != "test":
        if images.shape[0] <= NUM_VALID:
            raise SourceFormatError(
                f"{source}: {images.shape[0]} train images, need more than {NUM_VALID} to carve the validation split"
            )
        cut = slice(images.shape[0] - NUM_VALID, None) if split == "valid" else slice(0, images.shape[0] - NUM_VALID)
        images, labels = images[cut], labels[cut]
    if binarize:  # pixel ~ Bernoulli(grey / 255), one fixed draw per split
        rng = np.random.default_rng(BINARIZE_SEEDS[split])
        images = (rng.random(images.shape, dtype=np.float32) * 255.0 < images).astype(np.uint8)
    return ImageSet(
        images=np.ascontiguousarray(images[:, None]),
        labels=labels.astype(np.int64),
        bit_depth=1 if binarize else 8,
        name=f"{dataset}{'-binarized' if binarize else ''}/{split}",
    )
