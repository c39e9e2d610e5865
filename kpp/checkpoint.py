"""Save and load a model as its config plus state_dict. Loading uses torch.load(weights_only=True): only tensors
and plain containers are read back, never arbitrary pickled objects."""
from __future__ import annotations

import io
import os
from typing import BinaryIO

import torch

from kpp.config import KanervaConfig
from kpp.model import KanervaPlusPlus

FORMAT = "kanerva-pp/1"


def save_model(model: KanervaPlusPlus, target: str | os.PathLike | BinaryIO) -> None:
    payload = {"format": FORMAT, "config": model.cfg.to_dict(), "state_dict": model.state_dict()}
    torch.save(payload, target)


def load_model(source: str | os.PathLike | BinaryIO | bytes, map_location: str | torch.device = "cpu") -> KanervaPlusPlus:
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    payload = torch.load(source, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{source!r} is not a Kanerva++ model file (expected format {FORMAT!r})")
    model = KanervaPlusPlus(KanervaConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location)
