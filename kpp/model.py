"""Kanerva++ (Ramapuram, Wu, Kalousis, ICLR 2021): a generative episodic memory, top to bottom.

    X [B, T, C, H, W] --f_enc (TSM ResNet + MLP)--> E [B, T, F]
    E --key head--> q(y_tk | X) = N(mu, sigma^2) in R^3, K keys per image          prior p(y) = N(0, I)
    E, key means --f_mem (deterministic write)--> M [B, C_m, H_m, W_m]              a point mass: no KL
    M, y --f_ST (affine_grid + grid_sample)--> M_hat [B, T, K, C_m, w, w]
    M_hat, y --prior net--> p(z_t | M_hat_t, y_t);   E --dense head--> q(z_t | X)
    z --decoder--> p(x_t | z_t)  (Bernoulli or discretized logistic mixture)

Per image:  -ELBO = -log p(x_t | z_t) + KL[q(z_t|X) || p(z_t|M_hat_t, y_t)] + sum_k KL[q(y_tk|X) || N(0, I)].
One reparameterised sample of y and z; analytic Gaussian KLs. See kpp/objective.py for warm-up and free bits.
Which memory M scores x_t is the point: its own episode's (the paper's, memory-conditional: x_t is in M), the
other images' (leave-one-out), or x_1..x_{t-1}'s only (chain_memories: a proper bound on -ln p(X) / T, what the
default objective trains and what selects models).

The baselines share this class, its encoder, decoder and likelihood, and its interface (encode, write, terms,
log_weights, leave-one-out and chain memories), switched by memory.writer (cfg.kind):
- "dkm": DKM w/ TSM, the Dynamic Kanerva Machine's memory (kpp/dkm.py) in place of the 2-D memory and its keys;
  kl_y is the KL of the addressing weights w, kl_m the memory's KL against its prior (per image: / T). With
  encoder.shift_fraction=0 the encoder is a per-image conv net: the plain "DKM".
- "km": the Kanerva Machine, the same memory with learned addresses w = A y + b from a latent y_t per image
  inferred from the image alone (kpp/dkm.py); kl_y is the KL of y, kl_m as for DKM.
- "vae": no memory, p(z) = N(0, I); kl_y = 0. Its memory is a placeholder, so its swap gap is 0 by construction
  and its leave-one-out bound equals its -ELBO.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from kpp.config import KanervaConfig
from kpp.dkm import DynamicMemory, KanervaMemory
from kpp.encoder import EpisodeEncoder
from kpp.likelihood import build_likelihood
from kpp.memory import (CodeWriter, build_writer, grid_key_offsets, key_to_affine, normalise_by_coverage,
                        prefix_memories, read)
from kpp.objective import gaussian_kl, gaussian_log_prob, training_loss

KEY_DIM = 3  # (scale, shift_x, shift_y)
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0


@dataclass
class Encoding:
    """What the encoder and its heads infer from an episode: E and the Gaussian posteriors over y and z."""

    embedding: torch.Tensor  # [B, T, F]
    key_mean: torch.Tensor  # [B, T, K, 3]; KM: its addressing latent y as one key of S numbers, [B, T, 1, S]
    key_logvar: torch.Tensor  # as key_mean
    z_mean: torch.Tensor  # [B, T, d_z]
    z_logvar: torch.Tensor  # [B, T, d_z]


@dataclass
class Noise:
    """Standard-normal draws for the reparameterised y and z. Passing the same Noise to two evaluations pairs them,
    so that sampling noise cancels in their difference (the memory-swap gap)."""

    key: torch.Tensor  # [B, T, K, 3]
    z: torch.Tensor  # [B, T, d_z]

    @staticmethod
    def draw(cfg: KanervaConfig, batch: int, length: int, generator: torch.Generator | None = None,
             device=None) -> "Noise":
        t, k, dz = length, cfg.keys.num_reads, cfg.latent.dim
        # The key noise: K++'s keys y [B, T, K, 3], DKM's addressing weights w [B, T, K_m], KM's addressing latent
        # y [B, T, S], none for the VAE.
        key_shape = {"kpp": (k, KEY_DIM), "dkm": (cfg.memory.slots,), "km": (cfg.memory.address_dim,),
                     "vae": (0,)}[cfg.kind]
        # Drawn on the CPU from the (CPU) generator so a seed gives the same draws on any device.
        return Noise(
            key=torch.randn(batch, t, *key_shape, generator=generator).to(device),
            z=torch.randn(batch, t, dz, generator=generator).to(device),
        )


class LatentPrior(nn.Module):
    """p(z | M_hat, y): the K read blocks concatenated on channels through a small conv net (y enters through where
    the blocks were read; with latent.prior_sees_keys also as an input)."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        k, c, w, width = cfg.keys.num_reads, cfg.memory.channels, cfg.read.window, cfg.latent.prior_width
        self.reads_code = cfg.memory.writer == "key" and cfg.memory.content == "code"
        c += self.reads_code  # the code memory's reads carry their coverage as one more channel
        self.convs = nn.Sequential(
            nn.Conv2d(k * c, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()
        )
        self.sees_keys = cfg.latent.prior_sees_keys
        flat = width * math.ceil(w / 2) ** 2 + (k * KEY_DIM if self.sees_keys else 0)
        self.out = nn.Sequential(nn.Linear(flat, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * cfg.latent.dim))
        # memory.content = "code": the blocks hold codes (the posterior's mean and log-variance in their first 2 d_z
        # channels). The prior starts from the code it reads back, averaged over the K reads (a learned linear
        # readout of the blocks' window means, started at that average), and the conv net is a learned
        # correction started at zero. Under the paper's objective (objective.memory=episode) the readout starts
        # as the whole code: a read of x_t's own write gives p(z | M_hat) = q(z | X) at step 0. Under the chain
        # objective x_t's own write is never in its memory, so a copied log-variance (a posterior's: narrow)
        # would only make the prior overconfident about another image: the readout starts as the mean of the
        # codes read, the log-variance at 0 (N(mean code, I); the empty memory reads 0: N(0, I), a VAE's prior).
        if self.reads_code:
            dz = cfg.latent.dim
            self.readout = nn.Linear(k * 2 * dz, 2 * dz)
            with torch.no_grad():
                eye = torch.eye(2 * dz)
                if cfg.objective.memory == "chain":
                    eye[dz:] = 0.0
                self.readout.weight.copy_(eye.repeat(1, k) / k)
                self.readout.bias.zero_()
                self.out[-1].weight.zero_()
                self.out[-1].bias.zero_()

    def forward(self, blocks: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks [N, K, C_m, w, w], keys [N, K, 3] -> mean, logvar [N, d_z]."""
        h = self.convs(blocks.flatten(1, 2)).flatten(1)
        if self.sees_keys:
            h = torch.cat([h, keys.flatten(1)], dim=1)
        out = self.out(h)
        if self.reads_code:
            out = out + self.readout(blocks[:, :, : out.shape[1]].mean((-1, -2)).flatten(1))
        mean, logvar = out.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z -> per-pixel likelihood parameters: a linear map to a quarter-size feature map, two stride-2 transposed
    convs and an output conv, GroupNorm between them; cropped to the image size."""

    def __init__(self, cfg: KanervaConfig, params_per_channel: int):
        super().__init__()
        w, g = cfg.decoder.width, cfg.decoder.groups
        self.h, self.w = cfg.image_height, cfg.image_width
        self.h0, self.w0 = math.ceil(self.h / 4), math.ceil(self.w / 4)
        self.fc = nn.Linear(cfg.latent.dim, 2 * w * self.h0 * self.w0)
        self.net = nn.Sequential(
            nn.GroupNorm(g, 2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), nn.GroupNorm(g, 2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.GroupNorm(g, w), nn.ReLU(),
            nn.Conv2d(w, cfg.image_channels * params_per_channel, 3, 1, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, self.h0, self.w0)
        return self.net(h)[:, :, : self.h, : self.w]


class KanervaPlusPlus(nn.Module):
    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.kind = cfg.kind
        k, f, dz = cfg.keys.num_reads, cfg.encoder.embedding_dim, cfg.latent.dim
        self.encoder = EpisodeEncoder(cfg.encoder, cfg.image_channels, (cfg.image_height, cfg.image_width))
        if self.kind == "kpp":  # (modules are created in this order so that a seed gives the same initial weights)
            if cfg.keys.logvar == "amortized":
                self.key_posterior = nn.Linear(f, 2 * k * KEY_DIM)
                with torch.no_grad():  # output layout is [K, (mean, logvar), 3]
                    self.key_posterior.bias.view(k, 2, KEY_DIM)[:, 1].fill_(cfg.keys.init_logvar)
                    self.key_posterior.weight.view(k, 2, KEY_DIM, f)[:, 0].mul_(cfg.keys.init_mean_gain)
            else:  # keys.logvar = "shared": the means from the image, the log-variance a parameter [K, 3] (below)
                self.key_posterior = nn.Linear(f, k * KEY_DIM)
                with torch.no_grad():
                    self.key_posterior.weight.mul_(cfg.keys.init_mean_gain)
            self.writer = build_writer(cfg)
        self.z_posterior = nn.Linear(f, 2 * dz)
        if self.kind == "kpp":
            self.z_prior = LatentPrior(cfg)
        elif self.kind == "dkm":
            self.memory = DynamicMemory(cfg)
        elif self.kind == "km":
            self.memory = KanervaMemory(cfg)
        self.likelihood = build_likelihood(cfg.likelihood, cfg.image_channels)
        self.decoder = Decoder(cfg, self.likelihood.params_per_channel)
        if self.kind == "kpp":  # created last: the modules above start from the same weights whatever these are
            if cfg.keys.logvar == "shared":
                self.key_logvar = nn.Parameter(torch.full((k, KEY_DIM), float(cfg.keys.init_logvar)))
            if cfg.keys.layout == "grid":
                self.key_offset = nn.Parameter(grid_key_offsets(cfg))  # [T, K, 3], added to the key means
            if isinstance(self.writer, CodeWriter):  # the code an image writes starts as its posterior's
                with torch.no_grad():
                    code = self.writer.code
                    code.weight.view(k, cfg.memory.channels, f)[:, : 2 * dz].copy_(self.z_posterior.weight)
                    code.bias.view(k, cfg.memory.channels)[:, : 2 * dz].copy_(self.z_posterior.bias)

    # -- inference ------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> Encoding:
        """q(y | X), q(z | X) and E of episodes x [B, T', ...]. `positions` [T'] are the images' places in their
        episode (default 0..T'-1): keys.layout=grid gives each place its own cell, so an episode with images left
        out keeps the others at their own cells (leave-one-out, held-out images)."""
        self._check_input(x)
        b, t = x.shape[:2]
        e = self.encoder(x)
        if self.kind == "kpp":
            k = self.cfg.keys.num_reads
            if self.cfg.keys.logvar == "amortized":
                key_mean, key_logvar = self.key_posterior(e).view(b, t, k, 2, KEY_DIM).unbind(3)
            else:
                key_mean = self.key_posterior(e).view(b, t, k, KEY_DIM)
                key_logvar = self.key_logvar.expand_as(key_mean)
            if self.cfg.keys.layout == "grid":
                if t > self.key_offset.shape[0]:
                    raise ValueError(f"episodes of {t} images, but keys.layout=grid has cells for episode_length="
                                     f"{self.key_offset.shape[0]}: build the model with the longer episode_length")
                if self.cfg.keys.image_shift_gain != 1.0:  # (scale, shift_x, shift_y): damp the image's shifts
                    g = self.cfg.keys.image_shift_gain
                    key_mean = key_mean * key_mean.new_tensor([1.0, g, g])
                key_mean = key_mean + (self.key_offset[:t] if positions is None else self.key_offset[positions])
        elif self.kind == "km":  # KM's q(y_t | x_t), from the image's embedding
            key_mean, key_logvar = (h.unsqueeze(2) for h in self.memory.posterior(e))
        else:  # DKM's addressing depends on the memory (see _addressing); the VAE has none
            key_mean = key_logvar = e.new_zeros(b, t, 0, KEY_DIM)
        z_mean, z_logvar = self.z_posterior(e).chunk(2, dim=-1)
        return Encoding(e, key_mean, key_logvar.clamp(LOGVAR_MIN, LOGVAR_MAX), z_mean, z_logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def write(self, enc: Encoding) -> torch.Tensor:
        """f_mem: the memory M [B, C_m, H_m, W_m] of an episode, deterministic in E. DKM, KM: the posterior q(M | X),
        packed [B, K_m, d_z + K_m + 1] (kpp/dkm.py); VAE: a placeholder [B, 1] that nothing reads."""
        if self.kind == "dkm":
            return self.memory.write(enc.z_mean)
        if self.kind == "km":
            return self.memory.write(enc.z_mean, enc.key_mean[:, :, 0])
        if self.kind == "vae":
            return enc.z_mean.new_zeros(enc.z_mean.shape[0], 1)
        return self.writer(enc.embedding, enc.key_mean)

    def read_prior(self, memory: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read K blocks per image at keys [B, T, K, 3] and return the prior p(z | M_hat, y): mean, logvar [B, T, d_z].
        memory is [B, C_m, H_m, W_m] (one per episode) or [B, T, C_m, H_m, W_m] (one per image)."""
        b, t, k, _ = keys.shape
        theta = key_to_affine(keys, self.cfg.keys.min_scale, self.cfg.keys.max_scale)
        if memory.dim() == 5:  # per-image memories, e.g. leave-one-out
            blocks = read(memory.flatten(0, 1), theta.view(b * t, k, 2, 3), self.cfg.read.window)
        else:
            blocks = read(memory, theta.view(b, t * k, 2, 3), self.cfg.read.window)
        blocks = blocks.reshape(b * t, k, *blocks.shape[2:])
        if isinstance(self.writer, CodeWriter):
            blocks = normalise_by_coverage(blocks)
        mean, logvar = self.z_prior(blocks, keys.reshape(b * t, k, KEY_DIM))
        return mean.view(b, t, -1), logvar.view(b, t, -1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, T, d_z] -> likelihood parameters [B*T, C * params, H, W]."""
        return self.decoder(z.flatten(0, 1))

    # -- the objective --------------------------------------------------------------------------------------
    def terms(self, x: torch.Tensor, memory: torch.Tensor | None = None, noise: Noise | None = None,
              enc: Encoding | None = None) -> dict[str, torch.Tensor]:
        """The per-image terms of the negative ELBO, each [B, T], in nats. `memory` overrides the episode's own
        memory (another episode's for the swap gap, per-image leave-one-out memories); `noise` fixes the draws."""
        b, t = x.shape[:2]
        enc = enc if enc is not None else self.encode(x)
        if memory is None:
            memory = self.write(enc)
        if noise is None:
            noise = Noise.draw(self.cfg, b, t, device=x.device)
        if self.kind != "kpp":
            return self._baseline_terms(x, memory, noise, enc)
        y = enc.key_mean + torch.exp(0.5 * enc.key_logvar) * noise.key
        z = enc.z_mean + torch.exp(0.5 * enc.z_logvar) * noise.z
        prior_mean, prior_logvar = self.read_prior(memory, y)
        recon = self.likelihood.nll(self.decode(z), x.flatten(0, 1)).view(b, t)
        kl_z = gaussian_kl(enc.z_mean, enc.z_logvar, prior_mean, prior_logvar).sum(-1)
        kl_y_per_key = gaussian_kl(enc.key_mean, enc.key_logvar, torch.zeros_like(y), torch.zeros_like(y)).sum(-1)
        kl_y = kl_y_per_key.sum(-1)
        return {"recon": recon, "kl_z": kl_z, "kl_y": kl_y, "kl_y_per_key": kl_y_per_key, "total": recon + kl_z + kl_y}

    def forward(self, x: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
        """Training step quantities: "loss" (scalar to minimise, with warm-up beta and key free bits) and the
        per-image terms [B, T] ("recon", "kl_z", "kl_y", "total" = the negative ELBO without any shaping).
        objective.memory=chain (the default) scores x_t under the memory of the images before it (chain_memories);
        =episode, the paper's objective, under its whole episode's, or with objective.held_out = h, h random
        positions of every episode under the memory of the other T - h images (held_out_memories)."""
        obj = self.cfg.objective
        if obj.memory == "chain" and self.kind == "kpp":
            enc = self.encode(x)
            out = self.terms(x, memory=self.chain_memories(x, enc), enc=enc)
        elif obj.held_out:
            enc = self.encode(x)
            out = self.terms(x, memory=self.held_out_memories(x, enc, obj.held_out), enc=enc)
        else:
            out = self.terms(x)
        out["loss"] = training_loss(out, beta, obj.key_free_bits, beta_z=None if obj.kl_z_warmup else 1.0)
        return out

    def log_weights(self, x: torch.Tensor, num_samples: int, memory: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance weights log p(x, z, y | M) - log q(z, y | X) for num_samples draws from q: [S, B, T].
        log-mean-exp over S bounds log p(x_t | M) at least as tightly as the ELBO."""
        b, t = x.shape[:2]
        enc = self.encode(x)
        if memory is None:
            memory = self.write(enc)
        if self.kind != "kpp":
            return self._baseline_log_weights(x, num_samples, memory, enc, generator)
        flat_x = x.flatten(0, 1)
        out = []
        for _ in range(num_samples):
            noise = Noise.draw(self.cfg, b, t, generator=generator, device=x.device)
            y = enc.key_mean + torch.exp(0.5 * enc.key_logvar) * noise.key
            z = enc.z_mean + torch.exp(0.5 * enc.z_logvar) * noise.z
            prior_mean, prior_logvar = self.read_prior(memory, y)
            log_px = -self.likelihood.nll(self.decode(z), flat_x).view(b, t)
            log_pz = gaussian_log_prob(z, prior_mean, prior_logvar).sum(-1)
            log_py = gaussian_log_prob(y, torch.zeros_like(y), torch.zeros_like(y)).sum((-1, -2))
            log_qz = gaussian_log_prob(z, enc.z_mean, enc.z_logvar).sum(-1)
            log_qy = gaussian_log_prob(y, enc.key_mean, enc.key_logvar).sum((-1, -2))
            out.append(log_px + log_pz + log_py - log_qz - log_qy)
        return torch.stack(out)

    def held_out_memories(self, x: torch.Tensor, enc: Encoding, count: int) -> torch.Tensor:
        """Per-image memories [B, T, C_m, H_m, W_m]: for `count` positions drawn at random (the same in every episode
        of the batch), the memory written from the other images re-encoded without them; for the rest, the
        episode's own memory."""
        t = x.shape[1]
        held = torch.zeros(t, dtype=torch.bool, device=x.device)
        held[torch.randperm(t)[:count].to(x.device)] = True
        own = self.write(enc)
        rest = self.write(self.encode(x[:, ~held], positions=(~held).nonzero().squeeze(1)))
        return torch.where(held.view(1, t, 1, 1, 1), rest.unsqueeze(1), own.unsqueeze(1))

    def leave_one_out_memories(self, x: torch.Tensor) -> torch.Tensor:
        """For each image t, the memory written from the other T-1 images of its episode (re-encoded without t,
        so nothing of x_t reaches it through the temporal shift either): [B, T, C_m, H_m, W_m]."""
        t = x.shape[1]
        if self.kind == "vae":  # nothing to leave out of
            return x.new_zeros(x.shape[0], t, 1)
        memories = []
        places = torch.arange(t, device=x.device)
        for i in range(t):
            rest = torch.cat([x[:, :i], x[:, i + 1 :]], dim=1)
            memories.append(self.write(self.encode(rest, positions=torch.cat([places[:i], places[i + 1 :]]))))
        return torch.stack(memories, dim=1)

    def chain_memories(self, x: torch.Tensor, enc: Encoding | None = None) -> torch.Tensor:
        """For each image t, the memory written from x_1..x_{t-1} only (t = 1: the empty memory): [B, T, ...]. Scored
        under it, the mean over t of x_t's bound bounds -ln p(X) / T (the chain rule). With an encoder that does not
        look ahead (encoder.shift_direction=past) E_1..E_{t-1} are functions of x_1..x_{t-1}, and the memories are
        the writer's of a cumulative sum of the writes: one pass. With the bidirectional shift, each prefix is
        re-encoded alone (T passes), so x_t never reaches its memory through x_{t-1}'s embedding either.
        The VAE has no memory (a placeholder); DKM and KM keep their own proper bound (see kpp/evaluate.py)."""
        b, t = x.shape[:2]
        if self.kind == "vae":
            return x.new_zeros(b, t, 1)
        if self.kind != "kpp":
            raise ValueError(f"memory.writer={self.cfg.memory.writer!r}: DKM and KM bound -ln p(X) with their memory's "
                             "KL; their chain bound is that bound (kpp.evaluate), not a prefix memory")
        if self.cfg.encoder_is_causal:
            enc = enc if enc is not None else self.encode(x)
            return prefix_memories(self.writer, self.writer.contributions(enc.embedding, enc.key_mean))
        memories = [self.writer.empty(b)]
        for i in range(1, t):
            memories.append(self.write(self.encode(x[:, :i])))
        return torch.stack(memories, dim=1)

    # -- the baselines (cfg.kind "dkm", "km", "vae") ----------------------------------------------------------
    def _addressing(self, memory: torch.Tensor, enc: Encoding) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        """The addressing latent's posterior, mean and log-variance [B, T, D] (prior N(0, I)), and the map from a
        draw of it to the weights w [B, T, K_m]: DKM's latent is w itself, from least squares against the memory;
        KM's is y_t, from the image, through A."""
        if self.kind == "dkm":
            w_mean, w_logvar = self.memory.addressing(memory, enc.z_mean)
            return w_mean, w_logvar, lambda w: w
        return enc.key_mean[:, :, 0], enc.key_logvar[:, :, 0], self.memory.weights

    def _baseline_terms(self, x: torch.Tensor, memory: torch.Tensor, noise: Noise, enc: Encoding) -> dict[str, torch.Tensor]:
        b, t = x.shape[:2]
        z = enc.z_mean + torch.exp(0.5 * enc.z_logvar) * noise.z
        recon = self.likelihood.nll(self.decode(z), x.flatten(0, 1)).view(b, t)
        if self.kind == "vae":
            zero = torch.zeros_like(enc.z_mean)
            kl_z = gaussian_kl(enc.z_mean, enc.z_logvar, zero, zero).sum(-1)
            kl_y_per_key = recon.new_zeros(b, t, 0)
            kl_m = torch.zeros_like(recon)
        else:
            mem = self.memory
            a_mean, a_logvar, to_weights = self._addressing(memory, enc)
            a = a_mean + torch.exp(0.5 * a_logvar) * noise.key
            read, spread = mem.read(memory, to_weights(a))
            obs_var = mem.obs_var()
            # E over q(M) of KL[q(z) || N(M^T w, sigma^2 I)]: the KL at M's mean plus C w^T U w / (2 sigma^2).
            kl_z = (gaussian_kl(enc.z_mean, enc.z_logvar, read, obs_var.log().expand_as(read)).sum(-1)
                    + read.shape[-1] * spread / (2 * obs_var))
            zero = torch.zeros_like(a)
            kl_y_per_key = gaussian_kl(a_mean, a_logvar, zero, zero).sum(-1, keepdim=True)
            # The episode's memory KL, 1/T per image. A per-image memory (leave-one-out) is the posterior of the
            # other images, used as the prior of x_t: no memory KL (the predictive bound under q(M | x_-t)).
            kl_m = (mem.kl(memory) / t).unsqueeze(1).expand(b, t) if memory.dim() == 3 else torch.zeros_like(recon)
        kl_y = kl_y_per_key.sum(-1)
        out = {"recon": recon, "kl_z": kl_z, "kl_y": kl_y, "kl_y_per_key": kl_y_per_key,
               "total": recon + kl_z + kl_y + kl_m}
        if self.kind != "vae":
            out["kl_m"] = kl_m
        return out

    def _baseline_log_weights(self, x: torch.Tensor, num_samples: int, memory: torch.Tensor, enc: Encoding,
                              generator: torch.Generator | None) -> torch.Tensor:
        """VAE: log p(x | z) + log N(z; 0, I) - log q(z | X). DKM, KM: one draw M_s ~ q(M) shared by the S samples
        of (a, z), a the addressing latent (DKM's w, KM's y), log p(x | z) + log p(z | w(a), M_s) + log p(a)
        - log q(z) - log q(a), minus the memory KL / T: its log-mean-exp is, in expectation over M_s, a bound on the
        episode's -log p(X) / T per image at least as tight as the ELBO (kl_m enters both alike)."""
        b, t = x.shape[:2]
        flat_x = x.flatten(0, 1)
        if self.kind != "vae":
            mem = self.memory
            m_sample = mem.sample(memory, generator)
            if memory.dim() == 3:
                m_sample = m_sample.unsqueeze(1)
                kl_m = (mem.kl(memory) / t).unsqueeze(1)
            else:
                kl_m = torch.zeros(b, 1, device=x.device)
            a_mean, a_logvar, to_weights = self._addressing(memory, enc)
            obs_logvar = mem.obs_var().log()
        out = []
        for _ in range(num_samples):
            noise = Noise.draw(self.cfg, b, t, generator=generator, device=x.device)
            z = enc.z_mean + torch.exp(0.5 * enc.z_logvar) * noise.z
            log_px = -self.likelihood.nll(self.decode(z), flat_x).view(b, t)
            log_qz = gaussian_log_prob(z, enc.z_mean, enc.z_logvar).sum(-1)
            if self.kind == "vae":
                zero = torch.zeros_like(z)
                out.append(log_px + gaussian_log_prob(z, zero, zero).sum(-1) - log_qz)
                continue
            a = a_mean + torch.exp(0.5 * a_logvar) * noise.key
            read = (to_weights(a).unsqueeze(-2) @ m_sample).squeeze(-2)
            log_pz = gaussian_log_prob(z, read, obs_logvar.expand_as(read)).sum(-1)
            zero = torch.zeros_like(a)
            log_pa = gaussian_log_prob(a, zero, zero).sum(-1)
            log_qa = gaussian_log_prob(a, a_mean, a_logvar).sum(-1)
            out.append(log_px + log_pz + log_pa - log_qz - log_qa - kl_m)
        return torch.stack(out)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or tuple(x.shape[2:]) != self.cfg.image_shape:
            raise ValueError(f"expected episodes [B, T, {', '.join(map(str, self.cfg.image_shape))}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype} (see kpp.data.to_model_input)")
