"""Decoding image files (PNG, JPEG, ...) read through fsspec, for the directory-tree sources.

Decoding is per image by nature (one compressed file each); it happens once, in prepare, never in training.
Files are fetched with one fs.cat call per chunk, which async filesystems (s3fs) run concurrently.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline.data.sources.errors import SourceFormatError
from pipeline.retry import with_retries

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm")
FETCH_CHUNK = 256


def fetch_all(fs, paths: list[str]) -> dict[str, bytes]:
    contents: dict[str, bytes] = {}
    for start in range(0, len(paths), FETCH_CHUNK):
        chunk = paths[start : start + FETCH_CHUNK]
        fetched = with_retries(f"read {len(chunk)} files from {chunk[0]}", lambda: fs.cat(chunk))
        contents.update(fetched if isinstance(fetched, dict) else {chunk[0]: fetched})
    return contents


def decode_image(data: bytes, path: str, mode: str, size: int | None, expected: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H, W] (mode "L") or [H, W, 3] (mode "RGB"); checked against `expected` (H, W) before resizing."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if expected is not None and (image.height, image.width) != tuple(expected):
                raise SourceFormatError(f"{path}: image of {image.width}x{image.height}, expected "
                                        f"{expected[1]}x{expected[0]}")
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise SourceFormatError(f"{path}: not a readable image ({err})") from err


def image_mode(data: bytes, path: str) -> str:
    """The PIL mode of an encoded image ("1", "L", "RGB", ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.mode
    except (UnidentifiedImageError, OSError) as err:
        raise SourceFormatError(f"{path}: not a readable image ({err})") from err
