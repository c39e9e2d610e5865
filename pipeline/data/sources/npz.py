"""A generic .npz source: arrays x_train/x_valid/x_test (uint8 [N, H, W] or [N, C, H, W]) and optionally
y_train/y_valid/y_test (integer [N]). Loaded with allow_pickle=False: an object array is refused, never unpickled.

bit_depth: option bit_depth=1 or 8; by default 1 when every value is 0 or 1, else 8.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline.data.sources.errors import SourceFormatError
from pipeline.data.sources.files import read_bytes
from pipeline.data.sources.image_set import ImageSet
from pipeline.storage import filesystem


def load_npz_split(source: str, split: str, storage_options: dict | None = None,
                   bit_depth: int | None = None) -> ImageSet:
    fs, path = filesystem(source, storage_options)
    data = read_bytes(fs, path)  # a missing file raises SourceNotFoundError here, not a format error
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise SourceFormatError(f"{source}: not a readable .npz without pickles ({err})") from err
    with npz:
        key = f"x_{split}"
        if key not in npz.files:
            raise SourceFormatError(f"{source}: no array '{key}' (has {sorted(npz.files)})")
        images = npz[key]
        labels = npz[f"y_{split}"] if f"y_{split}" in npz.files else None
    where = f"{source}[{key}]"
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[0] == 0:
        raise SourceFormatError(f"{where}: {images.dtype} {images.shape}, expected uint8 [N, H, W] or [N, C, H, W], N > 0")
    if images.ndim == 3:
        images = images[:, None]
    if labels is not None:
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise SourceFormatError(f"{source}[y_{split}]: {labels.dtype} {labels.shape}, expected integer [{images.shape[0]}]")
        labels = labels.astype(np.int64)
    if bit_depth is None:
        bit_depth = 1 if images.max() <= 1 else 8
    if bit_depth == 1 and images.max() > 1:
        raise SourceFormatError(f"{where}: values up to {images.max()}, but bit_depth 1 needs 0/1")
    return ImageSet(images=np.ascontiguousarray(images), labels=labels, bit_depth=bit_depth, name=f"npz/{split}")
