"""Omniglot in its official layout: <source>/images_background and <source>/images_evaluation, each holding
<alphabet>/<character>/*.png of 105x105 binary drawings (white background, black strokes).

Images become ink = 1 (bit_depth 1). Option resize=N shrinks them bilinearly to NxN and thresholds at half
intensity (e.g. 28 for MNIST-sized models). Splits: test = images_evaluation; images_background is split by a
fixed seeded draw into valid (10%) and train (90%). Labels index the (alphabet, character) pairs of the
directory, sorted by name (background and evaluation have disjoint alphabets, so label ids are per directory).
"""
from __future__ import annotations

import numpy as np

from pipeline.data.sources.errors import SourceFormatError
from pipeline.data.sources.files import require_dir
from pipeline.data.sources.image_set import ImageSet
from pipeline.data.sources.images import fetch_all, decode_image
from pipeline.storage import filesystem, join

NATIVE_SIZE = 105
VALID_FRACTION = 0.1
VALID_SEED = 20_260_003


def load_omniglot_split(source: str, split: str, storage_options: dict | None = None,
                        resize: int | None = None) -> ImageSet:
    fs, base = filesystem(source, storage_options)
    folder = "images_evaluation" if split == "test" else "images_background"
    root = join(base, folder)
    require_dir(fs, root, join(source, folder), "<alphabet>/<character>/*.png")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(".png"))
    if not paths:
        raise SourceFormatError(f"{join(source, folder)}: no <alphabet>/<character>/*.png files (empty split)")
    characters = [p[len(root) + 1 :].rsplit("/", 1)[0] for p in paths]
    for path, character in zip(paths, characters):
        if character.count("/") != 1:
            raise SourceFormatError(f"{path}: expected {folder}/<alphabet>/<character>/<name>.png")
    names = sorted(set(characters))
    labels = np.searchsorted(names, characters).astype(np.int64)
    if split != "test":
        valid = np.zeros(len(paths), bool)
        valid[np.random.default_rng(VALID_SEED).permutation(len(paths))[: int(round(VALID_FRACTION * len(paths)))]] = True
        keep = np.flatnonzero(valid if split == "valid" else ~valid)
        paths, labels = [paths[i] for i in keep], labels[keep]
    contents = fetch_all(fs, paths)
    grey = np.stack([decode_image(contents[p], p, "L", resize, (NATIVE_SIZE, NATIVE_SIZE)) for p in paths])
    ink = (grey < 128).astype(np.uint8)[:, None]
    return ImageSet(images=np.ascontiguousarray(ink), labels=labels, bit_depth=1, name=f"omniglot/{split}")
