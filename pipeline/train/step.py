"""One optimiser step of Kanerva++: the step every training path runs (the distributed loop, the local/demo path
and the benchmark), so a change to clipping, skipping or precision reaches all of them at once.

Forward at the KL weight of the step, backward, clip the global gradient norm, and update only when the loss and
the gradient are finite (after DDP's all-reduce every rank sees the same gradient, so all ranks agree on a skip).
The lr schedule advances either way: it is a function of the step, not of the updates. What to do about a skip
(count it, stop) is the caller's policy.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

LOSS_TERMS = ("loss", "recon", "kl_z", "kl_y", "total")


@dataclass
class StepResult:
    terms: dict[str, torch.Tensor]  # detached batch means: LOSS_TERMS and kl_y_key<k>
    grad_norm: torch.Tensor         # before clipping
    ok: bool                        # False: non-finite loss or gradient, the update was skipped
    batch: torch.Tensor             # the input, for callers that evaluate on it (e.g. a swap gap)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, x: torch.Tensor, *,
               beta: float, grad_clip: float, precision: str = "fp32", noise_seed: int | None = None) -> StepResult:
    """x: episodes [B, T, C, H, W] on the model's device. noise_seed: reseed the sampling noise first (the
    distributed loop draws it from (seed, rank, step) so a resumed job repeats it exactly); None draws on."""
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with autocast:
        out = model(x, beta=beta)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    # one host sync for both checks (a GPU waits for the step once, not twice)
    ok = bool(torch.isfinite(grad_norm.detach() + out["loss"].detach().float()))
    if ok:
        optimizer.step()
    scheduler.step()
    terms = {k: out[k].detach().float().mean() for k in LOSS_TERMS}
    for k, v in enumerate(out["kl_y_per_key"].detach().float().mean((0, 1))):
        terms[f"kl_y_key{k}"] = v
    return StepResult(terms, grad_norm.detach(), ok, x)
