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


# -- deterministic pieces for figures: the same keys and the same z draws give the same images ----------------
@torch.no_grad()
def decode_at_keys(model: KanervaPlusPlus, memory: torch.Tensor, keys: torch.Tensor,
                   z_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Read M at keys [B, T, K, 3], take z = mean + std * z_noise of p(z | M_hat, y) (the prior mean when
    z_noise is None), decode to mean images [B, T, C, H, W]. Deterministic: no draws here."""
    b, t = keys.shape[:2]
    mean, logvar = model.read_prior(memory, keys)
    z = mean if z_noise is None else mean + torch.exp(0.5 * logvar) * z_noise.to(mean.device)
    return model.likelihood.mean(model.decode(z)).view(b, t, *model.cfg.image_shape)


def z_noise(model: KanervaPlusPlus, batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard-normal draws for z [B, T, d_z] (on the CPU generator, then the model's device)."""
    device = next(model.parameters()).device
    return torch.randn(batch, length, model.cfg.latent.dim, generator=generator).to(device)


@torch.no_grad()
def key_perturbation(model: KanervaPlusPlus, memory: torch.Tensor, keys: torch.Tensor, rows: int = 4,
                     std: float = 0.1, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's key perturbation: images at keys y (row 0) and at y + eps, eps ~ N(0, std^2 I) (rows 1..rows;
    std 0.1 is variance 0.01), all with the same z draw `noise` [B, T, d_z] (drawn here when None), so a row
    differs from row 0 only through its keys: [rows + 1, B, T, C, H, W]. With std = 0 every row is row 0."""
    if noise is None:
        noise = z_noise(model, keys.shape[0], keys.shape[1], generator)
    out = [decode_at_keys(model, memory, keys, noise)]
    for _ in range(rows):
        out.append(decode_at_keys(model, memory, perturb_keys(keys, std, generator), noise))
    return torch.stack(out)


@torch.no_grad()
def reconstruct(model: KanervaPlusPlus, episodes: torch.Tensor) -> torch.Tensor:
    """Mean images decoded from q(z | X)'s mean: [B, T, C, H, W]."""
    z = model.encode(episodes).z_mean
    return model.likelihood.mean(model.decode(z)).view(*episodes.shape[:2], *model.cfg.image_shape)


@torch.no_grad()
def read_back(model: KanervaPlusPlus, episodes: torch.Tensor) -> torch.Tensor:
    """What the memory returns for each image: M written from the episode, read at the image's own key means,
    decoded from the prior mean of z. [B, T, C, H, W]."""
    enc = model.encode(episodes)
    return decode_at_keys(model, model.write(enc), enc.key_mean)


def shift_logit(t: torch.Tensor) -> torch.Tensor:
    """The key value whose read is centred at t in (-1, 1) (the inverse of the tanh in memory.key_to_affine)."""
    return torch.atanh(t.clamp(-0.999, 0.999))


def scale_logit(model: KanervaPlusPlus, s: torch.Tensor) -> torch.Tensor:
    """The key value whose read covers a fraction s of the memory side (inverse of key_to_affine's sigmoid)."""
    lo, hi = model.cfg.keys.min_scale, model.cfg.keys.max_scale
    if hi <= lo:
        return torch.zeros_like(s)
    return torch.logit(((s - lo) / (hi - lo)).clamp(1e-3, 1 - 1e-3))


@torch.no_grad()
def key_sweep(model: KanervaPlusPlus, memory: torch.Tensor, scales: list[float], positions: list[float],
              base_keys: torch.Tensor | None = None, read: int | None = None) -> torch.Tensor:
    """What each region of the key space decodes to: for every read scale s and read centre (t_x, t_y) on the
    positions x positions grid, the image decoded (prior mean of z) from a memory [1, C_m, H_m, W_m] read there.
    read=None moves all K reads to that key; read=k moves read k only and keeps the others at base_keys [K, 3].
    Returns [len(scales), len(positions) (t_y, rows), len(positions) (t_x, columns), C, H, W]."""
    k = model.cfg.keys.num_reads
    device = memory.device
    pos = torch.tensor(positions, dtype=torch.float32)
    ty, tx = torch.meshgrid(pos, pos, indexing="ij")
    out = []
    for s in scales:
        key = torch.stack([scale_logit(model, torch.full_like(tx, float(s))), shift_logit(tx), shift_logit(ty)], -1)
        key = key.reshape(-1, 1, 3).to(device)  # [n*n, 1, 3]
        if read is None:
            keys = key.expand(-1, k, -1)
        else:
            keys = (torch.zeros(k, 3) if base_keys is None else base_keys).to(device).unsqueeze(0).repeat(key.shape[0], 1, 1)
            keys[:, read] = key[:, 0]
        images = decode_at_keys(model, memory.expand(1, *memory.shape[1:]), keys.unsqueeze(0))
        out.append(images.view(len(positions), len(positions), *model.cfg.image_shape))
    return torch.stack(out)
