"""The in-memory form every source returns: one split of one dataset."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """One split of a dataset, fully in memory.

    images: uint8 [N, C, H, W]; for bit_depth 1 the values are {0, 1}, for bit_depth 8 they are 0..255.
    labels: int64 [N], or None when the dataset has none (binarized MNIST).
    name:   "<dataset>/<split>", e.g. "binarized_mnist/test".
    """

    images: np.ndarray
    labels: np.ndarray | None
    bit_depth: int
    name: str

    def __post_init__(self) -> None:
        # Checked here once so that no consumer has to re-validate what a source hands it.
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} {self.images.shape}")
        if self.bit_depth not in (1, 8):
            raise ValueError(f"{self.name}: bit_depth must be 1 or 8, got {self.bit_depth}")
        if self.labels is not None:
            if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
                raise ValueError(
                    f"{self.name}: labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} {self.labels.shape}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]
