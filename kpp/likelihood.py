"""Image likelihoods p(x | z): Bernoulli for binarized data, discretized logistic mixture for 8-bit data.

Both return -log p(x | z) per image in nats (summed over pixels and channels). Inputs x are floats in [0, 1]:
{0, 1} for binarized data, k / 255 for 8-bit data.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kpp.config import LikelihoodConfig


class Bernoulli:
    def __init__(self, cfg: LikelihoodConfig, channels: int):
        self.channels = channels

    @property
    def params_per_channel(self) -> int:
        return 1

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params: logits [N, C, H, W]; x [N, C, H, W] -> [N]."""
        return F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


class DiscretizedLogisticMixture:
    """Per channel, a mixture of logistics discretized to 256 bins on [-1, 1] (PixelCNN++ without the
    autoregressive channel coupling; channels are independent given z)."""

    def __init__(self, cfg: LikelihoodConfig, channels: int):
        self.channels = channels
        self.k = cfg.num_mixtures

    @property
    def params_per_channel(self) -> int:
        return 3 * self.k  # mixture logits, means, log scales

    def _split(self, params: torch.Tensor):
        n, _, h, w = params.shape
        p = params.view(n, self.channels, 3, self.k, h, w)
        logits, means, log_scales = p[:, :, 0], p[:, :, 1], p[:, :, 2].clamp(min=-7.0)
        return logits, means, log_scales

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits, means, log_scales = self._split(params)
        x = (x * 2.0 - 1.0).unsqueeze(2)  # [-1, 1], broadcast over mixture components
        centered = x - means
        inv_s = torch.exp(-log_scales)
        half_bin = 1.0 / 255.0
        cdf_plus = torch.sigmoid(inv_s * (centered + half_bin))
        cdf_min = torch.sigmoid(inv_s * (centered - half_bin))
        log_cdf_plus = (inv_s * (centered + half_bin)) - F.softplus(inv_s * (centered + half_bin))  # for x = 0
        log_one_minus_cdf_min = -F.softplus(inv_s * (centered - half_bin))  # for x = 255
        cdf_delta = cdf_plus - cdf_min
        mid = inv_s * centered
        # In the tails the bin mass underflows; use the density at the bin centre times the bin width instead.
        log_pdf_mid = mid - log_scales - 2.0 * F.softplus(mid) + math.log(2.0 / 255.0)
        log_mass = torch.where(
            cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid
        )
        log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mass))
        log_probs = log_probs + F.log_softmax(logits, dim=2)
        return -torch.logsumexp(log_probs, dim=2).flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        logits, means, _ = self._split(params)
        weights = torch.softmax(logits, dim=2)
        return ((weights * means).sum(2).clamp(-1, 1) + 1.0) / 2.0

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits, means, log_scales = self._split(params)
        n, c, k, h, w = logits.shape
        probs = torch.softmax(logits, dim=2).permute(0, 1, 3, 4, 2).reshape(-1, k)
        comp = torch.multinomial(probs, 1, generator=generator).view(n, c, h, w, 1).permute(0, 1, 4, 2, 3)
        mu = means.gather(2, comp).squeeze(2)
        s = log_scales.gather(2, comp).squeeze(2).exp()
        u = torch.rand(mu.shape, generator=generator, device=mu.device).clamp(1e-5, 1 - 1e-5)
        x = (mu + s * (torch.log(u) - torch.log1p(-u))).clamp(-1, 1)
        return torch.round((x + 1.0) / 2.0 * 255.0) / 255.0


def build_likelihood(cfg: LikelihoodConfig, channels: int):
    return {"bernoulli": Bernoulli, "logistic_mixture": DiscretizedLogisticMixture}[cfg.kind](cfg, channels)
