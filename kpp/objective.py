"""The Kanerva++ objective's pieces: Gaussian densities and KLs, the KL warm-up schedule, and the training loss.

The reported bound is always the plain negative ELBO (`terms["total"]`); warm-up (beta < 1) and free bits on the
key KL shape training only.
"""
from __future__ import annotations

import math

import torch

from kpp.config import ObjectiveConfig

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL[N(mean_q, var_q) || N(mean_p, var_p)] per dimension (diagonal Gaussians), analytic."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mean_q - mean_p) ** 2) / torch.exp(logvar_p) - 1.0)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var) per dimension."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 / torch.exp(logvar))


def kl_beta(step: int, cfg: ObjectiveConfig) -> float:
    """KL warm-up weight at a training step: linear from kl_warmup_start to 1 over kl_warmup_steps."""
    if cfg.kl_warmup_steps <= 0 or step >= cfg.kl_warmup_steps:
        return 1.0
    return cfg.kl_warmup_start + (1.0 - cfg.kl_warmup_start) * step / cfg.kl_warmup_steps


def training_loss(terms: dict[str, torch.Tensor], beta: float, key_free_bits: float,
                  beta_z: float | None = None) -> torch.Tensor:
    """Mean over images of recon + beta_z * KL_z + beta * KL_y (beta_z = beta unless given), where each key's KL
    (batch mean) is not penalised below key_free_bits nats: that keeps the keys from collapsing onto the prior
    early in training."""
    kl_y = terms["kl_y_per_key"].flatten(0, 1).mean(0)  # [K]
    if key_free_bits > 0:
        kl_y = torch.clamp(kl_y, min=key_free_bits)
    loss = terms["recon"].mean() + (beta if beta_z is None else beta_z) * terms["kl_z"].mean() + beta * kl_y.sum()
    if "kl_m" in terms:  # DKM's and KM's memory KL (already 1/T per image), warmed up with the key (addressing) KL
        loss = loss + beta * terms["kl_m"].mean()
    return loss


def keys_at_floor(max_kl_per_key: list[float], key_free_bits: float, margin: float = 0.25) -> list[int]:
    """The key reads whose KL_y (batch mean, in nats) never rose more than `margin` above the free-bits floor,
    given each key's largest value logged once the KL warm-up was over (while beta < 1 every key drifts above
    the floor and back): reads that carried no address. Without free bits the floor is the prior (KL_y 0); a
    key below `margin` nats then counts as collapsed."""
    threshold = key_free_bits * (1.0 + margin) if key_free_bits > 0 else margin
    return [k for k, v in enumerate(max_kl_per_key) if v <= threshold]
