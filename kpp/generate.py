"""Generation from a memory: unconditional (empty memory) and conditional (memory written from an episode),
key perturbation (nearby keys give close images) and iterative inference (re-encode, re-read, re-decode)."""
from __future__ import annotations

import torch

from kpp.model import KEY_DIM, KanervaPlusPlus


def _sample_prior(model: KanervaPlusPlus, memory: torch.Tensor, keys: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Read at keys [B, T, K, 3], draw z from p(z | M_hat, y), decode to mean images [B, T, C, H, W]."""
    b, t = keys.shape[:2]
    mean, logvar = model.read_prior(memory, keys)
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * eps
    return model.likelihood.mean(model.decode(z)).view(b, t, *model.cfg.image_shape)


def prior_keys(model: KanervaPlusPlus, batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randn(batch, length, model.cfg.keys.num_reads, KEY_DIM, generator=generator).to(device)


@torch.no_grad()
def generate(model: KanervaPlusPlus, memory: torch.Tensor, length: int, generator: torch.Generator | None = None,
             keys: torch.Tensor | None = None) -> torch.Tensor:
    """length images per memory [B, C_m, H_m, W_m], with keys from the prior p(y) unless given."""
    if keys is None:
        keys = prior_keys(model, memory.shape[0], length, generator)
    return _sample_prior(model, memory, keys, generator)


@torch.no_grad()
def empty_memory(model: KanervaPlusPlus, batch: int) -> torch.Tensor:
    """The memory written from no images: generating from it is unconditional generation."""
    return model.writer.empty(batch)


@torch.no_grad()
def episode_memory(model: KanervaPlusPlus, episodes: torch.Tensor) -> torch.Tensor:
    """Conditional generation starts here: M written from real episodes [B, T, C, H, W]."""
    return model.write(model.encode(episodes))


@torch.no_grad()
def perturb_keys(keys: torch.Tensor, std: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """y + eps, eps ~ N(0, std^2 I) (the paper: variance 0.01)."""
    return keys + std * torch.randn(keys.shape, generator=generator).to(keys.device)


@torch.no_grad()
def iterative_inference(model: KanervaPlusPlus, memory: torch.Tensor, episodes: torch.Tensor, rounds: int = 3,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Keep M fixed; encode the (generated) episode, take y at q(Y | X_hat)'s mean, read, draw z from the prior,
    decode; repeat. Returns the episode after each round."""
    out = []
    x = episodes
    for _ in range(rounds):
        keys = model.encode(x).key_mean
        x = _sample_prior(model, memory, keys, generator)
        out.append(x)
    return out
