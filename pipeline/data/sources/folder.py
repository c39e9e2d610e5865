"""A generic folder of images in the ImageFolder layout: <source>/<split>/<class>/<image file>.

Labels index the class directories of the split, sorted by name (give every split the same class directories
for consistent labels). All images must have one size, unless resize=N makes them NxN. channels=1 converts to
grey, channels=3 to RGB (default: 1 if the first image is grey or binary, else 3). bit_depth 8.
"""
from __future__ import annotations

import numpy as np

from pipeline.data.sources.errors import SourceFormatError
from pipeline.data.sources.files import require_dir
from pipeline.data.sources.image_set import ImageSet
from pipeline.data.sources.images import IMAGE_SUFFIXES, decode_image, fetch_all, image_mode
from pipeline.storage import filesystem, join

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def load_folder_split(source: str, split: str, storage_options: dict | None = None, resize: int | None = None,
                      channels: int | None = None) -> ImageSet:
    fs, base = filesystem(source, storage_options)
    root = join(base, split)
    require_dir(fs, root, join(source, split), "<class>/<image files>")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise SourceFormatError(f"{join(source, split)}: no image files {IMAGE_SUFFIXES} in <class>/ folders (empty split)")
    relative = [p[len(root) + 1 :].split("/") for p in paths]
    for path, parts in zip(paths, relative):
        if len(parts) != 2:
            raise SourceFormatError(f"{path}: expected {split}/<class>/<image file>")
    classes = [parts[0] for parts in relative]
    names = sorted(set(classes))
    contents = fetch_all(fs, paths)
    if channels is None:
        channels = 1 if image_mode(contents[paths[0]], paths[0]) in GREY_MODES else 3
    if channels not in (1, 3):
        raise ValueError(f"folder option channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    first_image = decode_image(contents[paths[0]], paths[0], mode, resize, None)
    expected = None if resize else first_image.shape[:2]
    images = np.stack([first_image] + [decode_image(contents[p], p, mode, resize, expected) for p in paths[1:]])
    images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    labels = np.searchsorted(names, classes).astype(np.int64)
    return ImageSet(images=np.ascontiguousarray(images), labels=labels, bit_depth=8, name=f"folder/{split}")
