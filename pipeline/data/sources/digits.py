"""scikit-learn's bundled handwritten digits (load_digits): the offline default that installs with the project.

1,797 real 8x8 images at 17 grey levels (0..16). To look like binarized MNIST to the model they are
  1. resized to 28x28 by separable bilinear interpolation (one matrix product, no per-image loop),
  2. binarized by thresholding the interpolated intensity at 1/2, so bit_depth = 1 and every call and process
     sees the same pixels. (A seeded Bernoulli draw with p = intensity, as for MNIST, turned these coarse,
     upsampled grey levels into mostly noise: the demo's model scored 295 nats/image and its samples were blobs.)
  3. split by a fixed seeded permutation into train 1,397 / valid 200 / test 200.
"""
from __future__ import annotations

import numpy as np

from pipeline.data.sources.image_set import ImageSet

IMAGE_SIZE = 28
SPLIT_SIZES = {"train": 1397, "valid": 200, "test": 200}
# Fixed: changing either changes the dataset, so they are constants, not parameters.
INK_THRESHOLD = 0.5
SPLIT_SEED = 20_260_002


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of half-pixel-centred linear interpolation (as PIL/torch align_corners=False)."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centres - low
    weights = np.zeros((size_out, size_in))
    weights[np.arange(size_out), low] += 1 - frac
    weights[np.arange(size_out), high] += frac
    return weights


def load_digits_split(split: str) -> ImageSet:
    from sklearn.datasets import load_digits  # imported here: only this source needs scikit-learn

    bunch = load_digits()
    grey = bunch.images / 16.0  # [1797, 8, 8] in [0, 1]
    resize = bilinear_matrix(grey.shape[1], IMAGE_SIZE)
    prob = np.clip(np.einsum("oi,nij,pj->nop", resize, grey, resize), 0.0, 1.0)
    binary = (prob >= INK_THRESHOLD).astype(np.uint8)
    order = np.random.default_rng(SPLIT_SEED).permutation(binary.shape[0])
    start = {"train": 0, "valid": SPLIT_SIZES["train"], "test": SPLIT_SIZES["train"] + SPLIT_SIZES["valid"]}[split]
    chosen = np.sort(order[start : start + SPLIT_SIZES[split]])
    return ImageSet(
        images=np.ascontiguousarray(binary[chosen, None]),
        labels=bunch.target[chosen].astype(np.int64),
        bit_depth=1,
        name=f"digits/{split}",
    )
