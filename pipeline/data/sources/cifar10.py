"""CIFAR-10 from its binary release (never the pickled Python release): <source>/data_batch_{1..5}.bin and
test_batch.bin, or the same under <source>/cifar-10-batches-bin/. Each record is 1 label byte then 3072 pixel
bytes (1024 red, 1024 green, 1024 blue, row-major 32x32).

Splits, by file: train = data_batch_1..4 (40,000), valid = data_batch_5 (10,000), test = test_batch (10,000).
"""
from __future__ import annotations

import numpy as np

from pipeline.data.sources.errors import SourceFormatError
from pipeline.data.sources.files import find_file, read_bytes, require_dir
from pipeline.data.sources.image_set import ImageSet
from pipeline.storage import filesystem, join

RECORD_BYTES = 1 + 3 * 32 * 32
SPLIT_FILES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 5)],
    "valid": ["data_batch_5.bin"],
    "test": ["test_batch.bin"],
}


def parse_batch(data: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % RECORD_BYTES:
        raise SourceFormatError(f"{path}: {len(data)} bytes, expected a whole number of {RECORD_BYTES}-byte records "
                                "(1 label byte + 3072 pixel bytes)")
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise SourceFormatError(f"{path}: label {labels.max()} in record {int(labels.argmax())}, expected 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10_split(source: str, split: str, storage_options: dict | None = None) -> ImageSet:
    fs, base = filesystem(source, storage_options)
    require_dir(fs, base, source, "CIFAR-10 binary batches data_batch_N.bin, test_batch.bin")
    if not fs.isfile(join(base, "test_batch.bin")) and fs.isdir(join(base, "cifar-10-batches-bin")):
        base, source = join(base, "cifar-10-batches-bin"), join(source, "cifar-10-batches-bin")
    parts = [parse_batch(read_bytes(fs, path), path)
             for path in (find_file(fs, base, [name], source) for name in SPLIT_FILES[split])]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSet(images=np.ascontiguousarray(images), labels=labels, bit_depth=8, name=f"cifar10/{split}")
