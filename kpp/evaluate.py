"""Evaluation: three bounds, named for what the memory that scores x_t holds, each with its importance-weighted
(IWAE) bound beside it, and the memory-swap gap.

- chain_neg_elbo / chain_iwae (the honest one, what selects models): x_t under the memory written from
  x_1..x_{t-1} only (t = 1: the empty memory). The mean over t bounds -ln p(X) / T by the chain rule, so it compares
  with any likelihood model: a model that ignores the episode scores its VAE's number. chain_curve[n] is its mean
  over the images with n images already in memory. DKM and KM pay for their memory (KL(q(M | X) || p(M)) / T per
  image): their chain_* is their own proper bound. The VAE's is its bound.
- neg_elbo (the paper's quantity, memory-conditional): -ELBO of x_t with M written from its own episode, x_t
  included. A memory that carries x_t to its own prior drives it to the reconstruction error while predicting
  nothing: report it for the paper's row, never select by it.
- iwae: the importance-weighted bound on the same quantity, S samples of (y, z) from q; never looser than neg_elbo.
- swap_gap: neg_elbo with the next episode's memory minus neg_elbo with the own memory, both with the same draws of
  y and z (paired) so sampling noise cancels. ~0 means the memory content is ignored (the VAE baseline: exactly 0).
- loo_neg_elbo / loo_iwae: x_t under a memory written from the other T-1 images of its episode (leave-one-out),
  each at its own place in the episode. A bound on -log p(x_t | x_{-t}): what the memory knows about x_t from the
  rest of the episode, not x_t reading back its own write.

Units: nats/image for binarized data, bits/dim for 8-bit data (nats / (C*H*W*ln 2)).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from kpp.model import KanervaPlusPlus, Noise


def unit_scale(model: KanervaPlusPlus) -> float:
    """Multiply nats per image by this to get the reported unit."""
    cfg = model.cfg
    return 1.0 if cfg.bit_depth == 1 else 1.0 / (math.prod(cfg.image_shape) * math.log(2.0))


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """-log-mean-exp over samples (dim 0): the importance-weighted negative bound per image."""
    return -(torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0]))


@torch.no_grad()
def batch_swap_gap(model: KanervaPlusPlus, x: torch.Tensor, seed: int = 0) -> float:
    """The paired memory-swap gap on one batch of episodes (nats/image): cheap enough to log during training."""
    if x.shape[0] < 2:
        return float("nan")
    enc = model.encode(x)
    memory = model.write(enc)
    noise = Noise.draw(model.cfg, x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(seed), device=x.device)
    own = model.terms(x, memory=memory, noise=noise, enc=enc)["total"]
    swapped = model.terms(x, memory=memory.roll(-1, dims=0), noise=noise, enc=enc)["total"]
    return (swapped - own).mean().item()


def _batch_terms(model: KanervaPlusPlus, batch: torch.Tensor, own_memory, other_memory, generator: torch.Generator,
                 iwae_samples: int, leave_one_out: bool, chain: bool = True) -> dict[str, torch.Tensor]:
    """Every bound of one batch of episodes, per image [B, T] (nats), its draws from `generator` in a fixed order
    (z/y noise, own-memory IWAE, chain IWAE, then leave-one-out IWAE): evaluate and episode_bounds share it, and
    with it their numbers. The three bounds share the z/y noise, so their differences are paired."""
    b, t = batch.shape[:2]
    enc = model.encode(batch)
    noise = Noise.draw(model.cfg, b, t, generator=generator, device=batch.device)
    own = model.terms(batch, memory=own_memory, noise=noise, enc=enc)
    out = {name: own[name] for name in ("recon", "kl_z", "kl_y", "kl_m", "kl_y_per_key") if name in own}
    out["neg_elbo"] = own["total"]
    out["neg_elbo_swapped"] = model.terms(batch, memory=other_memory, noise=noise, enc=enc)["total"]
    out["iwae"] = iwae_bound(model.log_weights(batch, iwae_samples, memory=own_memory, generator=generator))
    if chain:
        if model.kind == "kpp":
            chain_memory = model.chain_memories(batch, enc)
            out["chain_neg_elbo"] = model.terms(batch, memory=chain_memory, noise=noise, enc=enc)["total"]
            out["chain_iwae"] = iwae_bound(model.log_weights(batch, iwae_samples, memory=chain_memory,
                                                             generator=generator))
        else:  # the VAE's bound, DKM's and KM's (their memory paid for in KL_M) are proper bounds already
            out["chain_neg_elbo"], out["chain_iwae"] = out["neg_elbo"], out["iwae"]
    if leave_one_out:
        loo_memory = model.leave_one_out_memories(batch)
        out["loo_neg_elbo"] = model.terms(batch, memory=loo_memory, noise=noise, enc=enc)["total"]
        out["loo_iwae"] = iwae_bound(model.log_weights(batch, iwae_samples, memory=loo_memory, generator=generator))
    return out


@torch.no_grad()
def evaluate(model: KanervaPlusPlus, episodes: torch.Tensor, *, iwae_samples: int = 16, seed: int = 0,
             batch_size: int = 16, leave_one_out: bool = True, chain: bool = True) -> dict[str, float]:
    """All bounds on fixed episodes [E, T, C, H, W] (floats in [0, 1]), averaged over images, in the data's unit;
    with chain, also chain_curve / chain_iwae_curve: lists of T values, entry n the bound of the images with n
    earlier images in memory. A fixed seed gives the same draws every call, so two checkpoints are compared on
    equal terms."""
    if episodes.shape[0] < 2:
        raise ValueError("evaluation needs at least 2 episodes (the swap gap gives each the next one's memory)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    batches = [episodes[i : i + batch_size] for i in range(0, episodes.shape[0], batch_size)]
    memories = torch.cat([model.write(model.encode(b.to(device))) for b in batches])
    others = memories.roll(-1, dims=0)  # episode i gets episode i+1's memory

    sums: dict[str, float] = defaultdict(float)
    kl_y_per_key = torch.zeros(model.cfg.key_terms)
    curves = {"chain_neg_elbo": torch.zeros(episodes.shape[1]), "chain_iwae": torch.zeros(episodes.shape[1])}
    images = 0
    start = 0
    for batch in batches:
        batch = batch.to(device)
        b, t = batch.shape[:2]
        terms = _batch_terms(model, batch, memories[start: start + b], others[start: start + b], generator,
                             iwae_samples, leave_one_out, chain)
        start += b
        kl_y_per_key += terms.pop("kl_y_per_key").sum((0, 1)).cpu()
        for name, curve in curves.items():
            if name in terms:
                curve += terms[name].sum(0).cpu()
        for name, value in terms.items():
            sums[name] += value.sum().item()
        images += b * t
    model.train(was_training)

    scale = unit_scale(model)
    result = {
        "neg_elbo": sums["neg_elbo"] / images * scale,
        "iwae": sums["iwae"] / images * scale,
        "recon": sums["recon"] / images * scale,
        "kl_z": sums["kl_z"] / images * scale,
        "kl_y": sums["kl_y"] / images * scale,
        "neg_elbo_swapped": sums["neg_elbo_swapped"] / images * scale,
        "swap_gap": (sums["neg_elbo_swapped"] - sums["neg_elbo"]) / images * scale,
        "unit": model.cfg.unit,
        "iwae_samples": iwae_samples,
        "num_images": images,
    }
    if "kl_m" in sums:  # DKM, KM: the memory's KL against its prior, per image
        result["kl_m"] = sums["kl_m"] / images * scale
    for k, v in enumerate((kl_y_per_key / images).tolist()):
        result[f"kl_y_key{k}"] = v * scale
    if leave_one_out:
        result["loo_neg_elbo"] = sums["loo_neg_elbo"] / images * scale
        result["loo_iwae"] = sums["loo_iwae"] / images * scale
    if chain:
        result["chain_neg_elbo"] = sums["chain_neg_elbo"] / images * scale
        result["chain_iwae"] = sums["chain_iwae"] / images * scale
        episodes_seen = images // episodes.shape[1]
        result["chain_curve"] = (curves["chain_neg_elbo"] / episodes_seen * scale).tolist()
        result["chain_iwae_curve"] = (curves["chain_iwae"] / episodes_seen * scale).tolist()
    return result


def describe(result: dict[str, float]) -> str:
    """One human-readable line per bound, each labelled with what it measures."""
    u, s = result["unit"], result["iwae_samples"]
    lines = []
    if "chain_neg_elbo" in result:
        lines.append(f"chain -ELBO (x_t from a memory of the images before it; bounds -ln p(X)/T): "
                     f"{result['chain_neg_elbo']:.3f} {u}  (IWAE S={s} {result['chain_iwae']:.3f})")
        curve = result.get("chain_curve")
        if curve:
            picks = sorted({0, 1, 2, 4, len(curve) // 2, len(curve) - 1} & set(range(len(curve))))
            lines.append("  chain -ELBO with n earlier images in memory: "
                         + "  ".join(f"n={n}: {curve[n]:.2f}" for n in picks))
    if "loo_neg_elbo" in result:
        lines.append(f"leave-one-out -ELBO (x_t from a memory of the other T-1 images): {result['loo_neg_elbo']:.3f} {u}"
                     f"  (IWAE S={s} {result['loo_iwae']:.3f})")
    lines += [
        f"memory-conditional -ELBO (x_t in its own memory; the paper's quantity): {result['neg_elbo']:.3f} {u}"
        f"  (IWAE S={s} {result['iwae']:.3f})",
        f"  terms: recon {result['recon']:.3f}  KL_z {result['kl_z']:.3f}  KL_y {result['kl_y']:.3f}",
        f"memory-swap gap (another episode's memory - own, paired draws): {result['swap_gap']:+.3f} {u}",
    ]
    return "\n".join(lines)


EPISODE_BOUNDS = ("neg_elbo", "recon", "kl_z", "kl_y", "neg_elbo_swapped", "swap_gap", "iwae", "chain_neg_elbo",
                  "chain_iwae", "loo_neg_elbo", "loo_iwae")  # and kl_m for DKM and KM


def batch_seed(seed: int, batch: int) -> int:
    """Seed of the draws of batch `batch` in episode_bounds: `seed` itself for the first batch (so a set of at most
    batch_size episodes gets evaluate()'s draws exactly), a seed derived from (seed, batch) for the others."""
    if batch == 0:
        return int(seed)
    import numpy as np
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


@torch.no_grad()
def episode_bounds(model: KanervaPlusPlus, episodes: torch.Tensor, *, partner: torch.Tensor | None = None,
                   iwae_samples: int = 16, seed: int = 0, batch_size: int = 16, first_batch: int = 0,
                   leave_one_out: bool = True, chain: bool = True) -> dict[str, torch.Tensor]:
    """The bounds of `evaluate`, one value per episode: each [E], nats per image (the mean over the episode's T
    images; every episode has T images, so the mean over episodes is evaluate()'s mean over images), for intervals
    over episodes. Keys: EPISODE_BOUNDS (the loo_* ones only with leave_one_out, chain_* only with chain).

    Draws: batch j of the set (batch_size episodes) draws from its own generator seeded with batch_seed(seed, j),
    in evaluate()'s order within the batch, so a set of at most batch_size episodes gets evaluate()'s numbers and
    any run of whole batches evaluated elsewhere (first_batch = its index) gets the numbers it has in the whole
    set: an evaluation can be split over processes. The swap gap gives episode i the memory of episode i + 1; the
    last episode gets `partner`'s ([1, T, C, H, W]: the episode after this run of batches; default the first
    episode, as evaluate's wrap-around)."""
    if episodes.shape[0] + (partner is not None) < 2:
        raise ValueError("evaluation needs at least 2 episodes (the swap gap gives each the next one's memory)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    partner = episodes[:1] if partner is None else partner
    batches = [episodes[i: i + batch_size] for i in range(0, episodes.shape[0], batch_size)]
    memories = torch.cat([model.write(model.encode(b.to(device))) for b in batches])
    others = torch.cat([memories[1:], model.write(model.encode(partner.to(device)))])
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    start = 0
    for j, batch in enumerate(batches):
        generator = torch.Generator().manual_seed(batch_seed(seed, first_batch + j))
        batch = batch.to(device)
        b = batch.shape[0]
        terms = _batch_terms(model, batch, memories[start: start + b], others[start: start + b], generator,
                             iwae_samples, leave_one_out, chain)
        start += b
        terms.pop("kl_y_per_key")
        terms["swap_gap"] = terms["neg_elbo_swapped"] - terms["neg_elbo"]
        for name, value in terms.items():
            out[name].append(value.mean(1))
    model.train(was_training)
    return {k: torch.cat(v).cpu() for k, v in out.items()}
