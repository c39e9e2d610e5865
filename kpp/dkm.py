"""The matrix-normal memories of the baselines: the Dynamic Kanerva Machine (DKM; Wu, Wayne, Gregor, Lillicrap
2018b) as "DKM w/ TSM" (the same TSM encoder and decoder as Kanerva++, DKM's memory in place of the 2-D memory and
its keys; with encoder.shift_fraction=0 the plain-conv "DKM"), and the Kanerva Machine (KM; Wu, Wayne, Graves,
Lillicrap 2018a), the same memory at learned addresses.

    memory M in R^{K_m x C} (C = d_z), prior  p(M) = MN(R_0, U_0, I)   R_0 learned, U_0 = diag(exp(prior_logvar)) learned
    addressing, DKM   w_t = (R R^T + lambda I)^-1 R z_t  (regularised least squares against the memory mean R)
                      q(w_t) = N(w_t, sigma_w^2 I)  (a variance, not a std: the public port's mistake),  p(w) = N(0, I)
    addressing, KM    a latent y_t in R^S, q(y_t | x_t) = N(mu, sigma^2) from the image's embedding, p(y) = N(0, I);
                      w_t = A y_t + b, A a learned K_m x S matrix, read once (no attractor iterations)
    write        per image, in episode order, the Kalman update of (R, U) observing z_t = M^T w_t + N(0, sigma_xi^2 I)
                 with z_t = the mean of q(z_t | X)                                                         (choice)
                 at DKM's least-squares address against the memory written so far, or at KM's A E[y_t] + b
    read         p(z_t | w_t, M) = N(M^T w_t, sigma_xi^2 I)
    bound        recon + E_q(M)[KL(q(z_t) || p(z_t | w_t, M))] + KL(q(w_t or y_t) || p) + KL(q(M | X) || p(M)) / T

E over q(M) of the z term is analytic: KL(q(z) || N(R^T w, sigma^2 I)) + C w^T U w / (2 sigma^2); the memory KL is
shared by the episode's T images and charged 1/T to each (every term per image, divided once).

A memory is passed around as one tensor so that the evaluation code can stack, roll and slice memories of any kind
alike: [..., K_m, C + K_m + 1] = [R | U | log det U] (the log-determinant, accumulated exactly by the matrix
determinant lemma during the write, repeated on every row). [B, K_m, ...] is one memory per episode;
[B, T, K_m, ...] one per image (leave-one-out).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn

from kpp.config import KanervaConfig

LOGVAR_MIN, LOGVAR_MAX = -9.0, 4.0  # observation noise and addressing variance: keep the write well conditioned


def address(mean: torch.Tensor, z: torch.Tensor, reg: float) -> torch.Tensor:
    """w = argmin_w ||z - mean^T w||^2 + reg ||w||^2 = (R R^T + reg I)^-1 R z.
    mean [..., K, C] (broadcast over z's extra dims), z [..., C] -> w [..., K]."""
    k = mean.shape[-2]
    gram = mean @ mean.transpose(-1, -2) + reg * torch.eye(k, dtype=mean.dtype, device=mean.device)
    rhs = (mean @ z.unsqueeze(-1))  # [..., K, 1]
    return torch.linalg.solve(gram, rhs).squeeze(-1)


def write(prior_mean: torch.Tensor, prior_var: torch.Tensor, codes: torch.Tensor, obs_var: torch.Tensor | float,
          reg: float) -> torch.Tensor:
    """DKM's write: each code at its least-squares address against the memory as written so far."""
    return write_at(prior_mean, prior_var, codes, obs_var, lambda mean, z: address(mean, z, reg))


def write_at(prior_mean: torch.Tensor, prior_var: torch.Tensor, codes: torch.Tensor, obs_var: torch.Tensor | float,
             addresses: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The sequential Bayesian write of codes [B, T, C] into MN(prior_mean [K, C], diag(prior_var [K]), I):
    returns the packed posterior memory [B, K, C + K + 1]. `addresses`: the weights [B, T, K] (KM's, known before
    the write), or a function (memory mean [B, K, C], code [B, C]) -> [B, K] of the memory written so far (DKM's)."""
    b, t, c = codes.shape
    k = prior_mean.shape[0]
    obs_var = torch.as_tensor(obs_var, dtype=codes.dtype, device=codes.device)
    mean = prior_mean.unsqueeze(0).expand(b, k, c)
    cov = torch.diag_embed(prior_var).unsqueeze(0).expand(b, k, k)
    logdet = prior_var.log().sum().expand(b)
    for i in range(t):
        z = codes[:, i]
        w = addresses(mean, z) if callable(addresses) else addresses[:, i]  # [B, K]
        uw = (cov @ w.unsqueeze(-1)).squeeze(-1)                # U w
        s = (w * uw).sum(-1) + obs_var                          # predictive variance of each code entry
        delta = z - (mean.transpose(1, 2) @ w.unsqueeze(-1)).squeeze(-1)  # z - R^T w
        gain = uw / s.unsqueeze(-1)
        mean = mean + gain.unsqueeze(-1) * delta.unsqueeze(1)
        cov = cov - gain.unsqueeze(-1) * uw.unsqueeze(1)
        logdet = logdet + torch.log(obs_var) - torch.log(s)     # det(U - U w w^T U / s) = det(U) sigma^2 / s
    return pack(mean, cov, logdet)


def pack(mean: torch.Tensor, cov: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    k = mean.shape[-2]
    return torch.cat([mean, cov, logdet[..., None, None].expand(*logdet.shape, k, 1)], dim=-1)


def unpack(memory: torch.Tensor, code_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> mean [..., K, C], cov [..., K, K], logdet [...]."""
    k = memory.shape[-2]
    return memory[..., :code_dim], memory[..., code_dim : code_dim + k], memory[..., 0, code_dim + k]


def memory_kl(mean: torch.Tensor, cov: torch.Tensor, logdet: torch.Tensor, prior_mean: torch.Tensor,
              prior_var: torch.Tensor) -> torch.Tensor:
    """KL[MN(mean, cov, I_C) || MN(prior_mean, diag(prior_var), I_C)] per memory, in nats:
    0.5 [C tr(U0^-1 U) + tr((R - R0)^T U0^-1 (R - R0)) - C K + C (log det U0 - log det U)]."""
    k, c = prior_mean.shape
    trace = (torch.diagonal(cov, dim1=-2, dim2=-1) / prior_var).sum(-1)
    maha = ((mean - prior_mean) ** 2 / prior_var.unsqueeze(-1)).sum((-1, -2))
    return 0.5 * (c * trace + maha - c * k + c * (prior_var.log().sum() - logdet))


def full_precision(method):
    """Run a memory method in float32 outside autocast (the least-squares solves and the Kalman update need it;
    under bf16 autocast the codes arrive in bf16)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        device = self.prior_mean.device.type
        with torch.autocast(device_type=device, enabled=False):
            return method(self, *args, **kwargs)
    return wrapper


class MatrixNormalMemory(nn.Module):
    """What DKM and KM share: the prior p(M) = MN(R_0, U_0, I), the observation noise sigma_xi^2, the read prior,
    the memory KL and draws of M. Codes are the latent z (C = latent.dim); K_m = memory.slots."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        k, c = cfg.memory.slots, cfg.latent.dim
        self.code_dim = c
        # Rows of R_0 ~ N(0, 1/K): a read w^T R_0 with w ~ p(w) = N(0, I) has about unit variance, like z's.
        self.prior_mean = nn.Parameter(torch.randn(k, c) / math.sqrt(k))
        self.prior_logvar = nn.Parameter(torch.full((k,), -math.log(k)))
        self.obs_logvar = nn.Parameter(torch.zeros(()))      # sigma_xi^2, learned

    def prior_var(self) -> torch.Tensor:
        return self.prior_logvar.exp()

    def obs_var(self) -> torch.Tensor:
        return self.obs_logvar.clamp(LOGVAR_MIN, LOGVAR_MAX).exp()

    def empty(self, batch: int) -> torch.Tensor:
        """The prior as a memory (nothing written)."""
        k = self.prior_mean.shape[0]
        var = self.prior_var()
        return pack(self.prior_mean, torch.diag_embed(var), var.log().sum()).expand(batch, k, -1)

    @full_precision
    def kl(self, memory: torch.Tensor) -> torch.Tensor:
        mean, cov, logdet = unpack(memory, self.code_dim)
        return memory_kl(mean, cov, logdet, self.prior_mean, self.prior_var())

    @full_precision
    def read(self, memory: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_t | w_t, M) with M at its mean: mean M^T w [B, T, C], and the read's variance under q(M), w^T U w
        [B, T] (each of the C entries of M^T w has that variance)."""
        mean, cov, _ = unpack(memory, self.code_dim)
        if memory.dim() == 3:
            mean, cov = mean.unsqueeze(1), cov.unsqueeze(1)
        read = (w.unsqueeze(-2) @ mean).squeeze(-2)
        spread = (w.unsqueeze(-2) @ cov @ w.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        return read, spread

    def sample(self, memory: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of M ~ MN(R, U, I), [..., K, C] (for the importance-weighted bound)."""
        mean, cov, _ = unpack(memory, self.code_dim)
        k = cov.shape[-1]
        jitter = 1e-6 * torch.eye(k, dtype=torch.float64, device=cov.device)
        chol = torch.linalg.cholesky(0.5 * (cov + cov.transpose(-1, -2)).double() + jitter).to(cov.dtype)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return mean + chol @ eps


class DynamicMemory(MatrixNormalMemory):
    """DKM: addresses by least squares of the code against the memory, q(w) = N(w, sigma_w^2 I)."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__(cfg)
        self.reg = cfg.memory.address_reg
        self.address_logvar = nn.Parameter(torch.zeros(()))  # sigma_w^2, learned

    @full_precision
    def write(self, codes: torch.Tensor) -> torch.Tensor:
        return write(self.prior_mean, self.prior_var(), codes, self.obs_var(), self.reg)

    @full_precision
    def addressing(self, memory: torch.Tensor, z_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(w_t): mean [B, T, K] (least squares of z_t's posterior mean against the memory mean), log-variance
        [B, T, K]. memory [B, K, ...] (per episode) or [B, T, K, ...] (per image)."""
        mean = unpack(memory, self.code_dim)[0]
        if memory.dim() == 3:
            mean = mean.unsqueeze(1)
        w = address(mean, z_mean, self.reg)
        logvar = self.address_logvar.clamp(LOGVAR_MIN, LOGVAR_MAX).expand_as(w)
        return w, logvar


class KanervaMemory(MatrixNormalMemory):
    """KM: learned addresses. Each image infers y_t from its embedding alone, so where it is written and read does
    not depend on the memory's content; w_t = A y_t + b."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__(cfg)
        s, k = cfg.memory.address_dim, cfg.memory.slots
        self.address_posterior = nn.Linear(cfg.encoder.embedding_dim, 2 * s)  # E_t -> q(y_t | x_t): mean, logvar
        self.projection = nn.Linear(s, k)                                       # A, b
        # A ~ N(0, 1/S): w = A y with y ~ p(y) = N(0, I) starts at about p(w) = N(0, I), DKM's address prior.
        nn.init.normal_(self.projection.weight, std=1 / math.sqrt(s))
        nn.init.zeros_(self.projection.bias)

    def posterior(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(y_t | x_t): mean, log-variance [B, T, S] from E [B, T, F]."""
        mean, logvar = self.address_posterior(embedding).chunk(2, dim=-1)
        return mean, logvar

    @full_precision
    def weights(self, y: torch.Tensor) -> torch.Tensor:
        """w = A y + b: [..., S] -> [..., K]."""
        return self.projection(y)

    @full_precision
    def write(self, codes: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
        """Each code z_t [B, T, C] at the address of its y_t's posterior mean [B, T, S]."""
        return write_at(self.prior_mean, self.prior_var(), codes, self.obs_var(), self.weights(y_mean))
