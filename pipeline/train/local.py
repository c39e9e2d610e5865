"""Single-process training of a Kanerva++ model on an in-memory split: the loop in plain sight.

Used by the demo and the memory experiments; the distributed job (Ray Train over shards) and the benchmark run
the same step (pipeline.train.step) and the same optimiser and schedule (pipeline.train.optim). Training episodes are re-drawn each epoch from a seeded shuffle (pipeline.data.episodes.epoch_episodes).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from kpp.evaluate import batch_swap_gap
from kpp.model import KanervaPlusPlus
from kpp.objective import kl_beta
from pipeline.train import config, optim
from pipeline.train.config import JobConfig
from pipeline.data.episodes import class_episodes, epoch_episodes
from pipeline.train.metrics import IdleKeys
from pipeline.train.step import train_step


# The in-process recipe the memory experiments, the demo and the benchmark were measured with
# (docs/memory-experiments.md): Adam, a looser gradient clip and a longer warm-up than the distributed job's
# defaults. It comes first, so a caller's overrides win; every field is the job config's own.
IN_PROCESS_RECIPE = ("train.optimizer=adam", "train.grad_clip=10.0", "train.warmup_steps=50", "train.log_every=50",
                     "train.max_steps=300", "data.batch_episodes=16", "tracking.enabled=false")


def local_job(overrides: Sequence[str] = ()) -> JobConfig:
    """The config of an in-process run: the jobs' one config path (YAML-typed `a.b=value` overrides, validated,
    errors naming the field) over IN_PROCESS_RECIPE. Of it the in-process trainer reads `train` (steps, optimiser,
    schedule, clip, log_every), `data.batch_episodes`, `data.episodes`, `seed` and `model`."""
    return config.load(None, [*IN_PROCESS_RECIPE, *overrides])


def episode_batches(images: torch.Tensor, episode_length: int, batch_size: int, seed: int,
                    labels: np.ndarray | None = None) -> Iterator[torch.Tensor]:
    """Endless batches [B, T, C, H, W] of training episodes, a fresh shuffle every epoch; episodes of one class
    each when labels are given."""
    epoch = 0
    while True:
        order = (epoch_episodes(images.shape[0], episode_length, seed, epoch) if labels is None
                 else class_episodes(labels, episode_length, seed, epoch))
        episodes = torch.from_numpy(order)
        for i in range(0, episodes.shape[0] - batch_size + 1, batch_size):
            yield images[episodes[i : i + batch_size]]
        epoch += 1


def train_local(model: KanervaPlusPlus, images: torch.Tensor, job: JobConfig,
                on_log: Callable[[dict], None] | None = None, labels: np.ndarray | None = None) -> list[dict]:
    """Train in place on images [N, C, H, W] (floats in [0, 1]) as `job` says (local_job); returns the logged
    history. Class episodes (data.episodes=class) are built from `labels` [N]."""
    t, steps = job.train, job.train.max_steps
    if job.data.episodes == "class" and labels is None:
        raise ValueError("data.episodes='class' needs labels, and this split has none")
    torch.manual_seed(job.seed)
    optimizer, scheduler = optim.build(model.parameters(), t)
    batches = episode_batches(images, model.cfg.episode_length, job.data.batch_episodes, job.seed,
                              labels if job.data.episodes == "class" else None)
    history: list[dict] = []
    window: dict[str, torch.Tensor] = {}  # summed on the model's device: no host sync per step on a GPU
    start = time.perf_counter()
    device = next(model.parameters()).device
    keys = IdleKeys(model.cfg.objective.kl_warmup_steps)  # the distributed loop's idle-key rule, fed every step
    model.train()
    for step in range(steps):
        x = next(batches).to(device, non_blocking=True)
        beta = kl_beta(step, model.cfg.objective)
        r = train_step(model, optimizer, scheduler, x, beta=beta, grad_clip=t.grad_clip)
        if not r.ok:
            raise FloatingPointError(f"non-finite loss or gradient at step {step}")
        grad_norm = r.grad_norm
        per_key = [float(r.terms[f"kl_y_key{k}"]) for k in range(model.cfg.key_terms)]
        keys.update(step + 1, per_key)
        for name in ("loss", "total", "recon", "kl_z", "kl_y"):
            window[name] = window.get(name, 0.0) + r.terms[name].detach()
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            n = (step % t.log_every) + 1
            record = {"step": step + 1, "beta": beta, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "seconds": time.perf_counter() - start, **{k: float(v) / n for k, v in window.items()}}
            record["kl_y_per_key"] = per_key
            record["keys_at_floor"] = keys.at_floor(model.cfg.objective.key_free_bits)
            record["swap_gap"] = batch_swap_gap(model, x)
            history.append(record)
            window.clear()
            if on_log:
                on_log(record)
    return history
