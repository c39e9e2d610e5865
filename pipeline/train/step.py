"""One optimiser step of Kanerva++: the step every training path runs (the distributed loop, the local/demo path
and the benchmark), so a change to clipping, skipping or precision reaches all of them at once.

Forward at the KL weight of the step, backward, clip the global gradient norm, and update only when the loss and
the gradient are finite (after DDP's all-reduce every rank sees the same gradient, so all ranks agree on a skip).
The lr schedule advances either way: it is a function of the step, not of the updates. What to do about a skip
(count it, stop) is the caller's policy.

No host sync: the step never makes the CPU wait for the device, so on a GPU the next batch's copy and the next
step's kernel launches overlap this step. The finiteness test stays on the device (`StepResult.ok` is a 0-d bool
tensor) and the skip happens there too: fused optimisers (pipeline.train.optim builds them) take a `found_inf`
tensor, the mechanism torch.amp.GradScaler uses, and leave parameters, moments and step counts untouched where
it is 1. An optimiser without fused kernels falls back to a host-side test (one sync per step).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

LOSS_TERMS = ("loss", "recon", "kl_z", "kl_y", "total")


@dataclass
class StepResult:
    terms: dict[str, torch.Tensor]  # detached batch means on the device: LOSS_TERMS and kl_y_key<k>
    grad_norm: torch.Tensor         # before clipping
    ok: torch.Tensor                # 0-d bool on the device; False: non-finite loss or gradient, update skipped


def seed_step_noise(seed: int, device: torch.device) -> None:
    """Reseed the sampling noise of the device the step runs on. torch.manual_seed also queues a seeding of every
    CUDA/XPU device, and on a machine whose CUDA is not initialised each queued call keeps a formatted stack
    trace (torch.cuda._lazy_call): ~2 ms and a growing list per step, measured here."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # this device only: the others draw nothing in the step


def fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group runs a fused kernel that accepts found_inf."""
    return all(group.get("fused") for group in optimizer.param_groups)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, x: torch.Tensor, *,
               beta: float, grad_clip: float, precision: str = "fp32", noise_seed: int | None = None) -> StepResult:
    """x: episodes [B, T, C, H, W] on the model's device. noise_seed: reseed the sampling noise first (the
    distributed loop draws it from (seed, rank, step) so a resumed job repeats it exactly); None draws on."""
    if noise_seed is not None:
        seed_step_noise(noise_seed, x.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with autocast:
        out = model(x, beta=beta)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    # the optimiser's parameters are the model's: listed from its groups, not by walking the module tree
    # (model.parameters(): ~0.14 ms of Python per step here, over 54 modules; on a GPU that is launch time)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf).detach()
    ok = torch.isfinite(grad_norm + out["loss"].detach().float())
    if fused(optimizer):
        optimizer.found_inf = (~ok).float()  # read by the fused kernel, as GradScaler passes it
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):  # the fallback's host sync
        optimizer.step()
    scheduler.step()
    terms = {k: out[k].detach().float().mean() for k in LOSS_TERMS}
    for k, v in enumerate(out["kl_y_per_key"].detach().float().mean((0, 1))):
        terms[f"kl_y_key{k}"] = v
    return StepResult(terms, grad_norm, ok)
