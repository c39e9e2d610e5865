"""The model's input convention: episodes as float tensors in [0, 1] ({0, 1} for binarized data, k/255 for 8-bit)."""
from __future__ import annotations

import numpy as np
import torch


def to_model_input(images: np.ndarray | torch.Tensor, bit_depth: int) -> torch.Tensor:
    """uint8 images (any leading shape) -> float32 in [0, 1]. Binarized data must hold only 0 and 1."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if bit_depth == 1:
        if x.numel() and int(x.max()) > 1:
            raise ValueError(f"bit_depth 1 expects pixels in {{0, 1}}, found max {int(x.max())}")
        return x.float()
    if bit_depth == 8:
        return x.float() / 255.0
    raise ValueError(f"bit_depth must be 1 or 8, got {bit_depth}")
