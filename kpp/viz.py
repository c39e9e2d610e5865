"""A PNG grid of what the model does with an episode: the episode, its reconstructions, conditional samples,
key-perturbed samples, iterative inference rounds and unconditional samples. One row each, T columns."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from kpp import generate as gen
from kpp.model import KanervaPlusPlus

ROW_LABELS = ["episode", "reconstruction", "conditional", "key-perturbed", "iterative 1", "iterative 2",
              "iterative 3", "unconditional"]


@torch.no_grad()
def sample_rows(model: KanervaPlusPlus, episode: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """episode [1, T, C, H, W] -> rows [T, C, H, W] in [0, 1], in ROW_LABELS order."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    episode = episode.to(device)
    t = episode.shape[1]
    enc = model.encode(episode)
    memory = model.write(enc)
    recon = model.likelihood.mean(model.decode(enc.z_mean)).view(1, t, *model.cfg.image_shape)
    keys = gen.prior_keys(model, 1, t, g)
    conditional = gen.generate(model, memory, t, g, keys=keys)
    perturbed = gen.generate(model, memory, t, g, keys=gen.perturb_keys(keys, 0.1, g))
    rounds = gen.iterative_inference(model, memory, conditional, rounds=3, generator=g)
    unconditional = gen.generate(model, gen.empty_memory(model, 1), t, g)
    model.train(was_training)
    return [r[0].cpu() for r in [episode, recon, conditional, perturbed, *rounds, unconditional]]


def save_sample_grid(model: KanervaPlusPlus, episode: torch.Tensor, path: str | os.PathLike, seed: int = 0,
                     scale: int = 2) -> str:
    rows = sample_rows(model, episode, seed)
    c, h, w = rows[0].shape[1:]
    pad = 2
    t = rows[0].shape[0]
    canvas = np.ones(((h + pad) * len(rows) + pad, (w + pad) * t + pad, c), dtype=np.float32)
    for i, row in enumerate(rows):
        for j in range(t):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = row[j].permute(1, 2, 0).clamp(0, 1).numpy()
    pixels = (canvas * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return str(path)
