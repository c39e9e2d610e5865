"""Single-process training of a Kanerva++ model on an in-memory split: the loop in plain sight.

Used by the demo and the memory experiments; the distributed job (Ray Train over shards) and the benchmark run
the same step (pipeline.train.step) and the same optimiser and schedule (pipeline.train.optim). Training episodes are re-drawn each epoch from a seeded shuffle (pipeline.data.episodes.epoch_episodes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from kpp.evaluate import batch_swap_gap
from kpp.model import KanervaPlusPlus
from kpp.objective import keys_at_floor, kl_beta
from pipeline.train import optim
from pipeline.train.config import TrainConfig
from pipeline.data.episodes import class_episodes, epoch_episodes
from pipeline.train.step import train_step


@dataclass(kw_only=True)
class LocalTrainConfig:
    steps: int = 300
    batch_size: int = 16  # episodes per step
    lr: float = 1e-3
    warmup_steps: int = 50  # linear lr warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    grad_clip: float = 10.0
    seed: int = 0
    log_every: int = 50
    # "random": T images drawn from the shuffled split (the paper); "class": T images of one class (needs labels).
    episodes: str = "random"


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


def optimizer_config(cfg: LocalTrainConfig) -> TrainConfig:
    """The run config's train section for this local run: Adam, linear warm-up, cosine decay to lr_min_ratio."""
    return TrainConfig(max_steps=cfg.steps, optimizer="adam", lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       schedule="cosine", min_lr_ratio=cfg.lr_min_ratio, grad_clip=cfg.grad_clip)


def train_local(model: KanervaPlusPlus, images: torch.Tensor, cfg: LocalTrainConfig,
                on_log: Callable[[dict], None] | None = None, labels: np.ndarray | None = None) -> list[dict]:
    """Train in place on images [N, C, H, W] (floats in [0, 1]); returns the logged history. Class episodes
    (cfg.episodes == "class") are built from `labels` [N]."""
    if cfg.episodes not in ("random", "class"):
        raise ValueError(f"train.episodes must be 'random' or 'class', got {cfg.episodes!r}")
    if cfg.episodes == "class" and labels is None:
        raise ValueError("train.episodes='class' needs labels, and this split has none")
    torch.manual_seed(cfg.seed)
    optimizer, scheduler = optim.build(model.parameters(), optimizer_config(cfg))
    batches = episode_batches(images, model.cfg.episode_length, cfg.batch_size, cfg.seed,
                              labels if cfg.episodes == "class" else None)
    history: list[dict] = []
    window: dict[str, torch.Tensor] = {}  # summed on the model's device: no host sync per step on a GPU
    start = time.perf_counter()
    device = next(model.parameters()).device
    model.train()
    for step in range(cfg.steps):
        x = next(batches).to(device, non_blocking=True)
        beta = kl_beta(step, model.cfg.objective)
        r = train_step(model, optimizer, scheduler, x, beta=beta, grad_clip=cfg.grad_clip)
        if not r.ok:
            raise FloatingPointError(f"non-finite loss or gradient at step {step}")
        grad_norm = r.grad_norm
        per_key = torch.stack([r.terms[f"kl_y_key{k}"] for k in range(model.cfg.key_terms)]) if model.cfg.key_terms else torch.zeros(0)
        if step == 0 or step == model.cfg.objective.kl_warmup_steps:  # idle keys are judged after the warm-up
            max_per_key = per_key
        max_per_key = torch.maximum(max_per_key, per_key)
        for name in ("loss", "total", "recon", "kl_z", "kl_y"):
            window[name] = window.get(name, 0.0) + r.terms[name].detach()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            record = {"step": step + 1, "beta": beta, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "seconds": time.perf_counter() - start, **{k: float(v) / n for k, v in window.items()}}
            record["kl_y_per_key"] = per_key.tolist()
            record["keys_at_floor"] = keys_at_floor(max_per_key.tolist(), model.cfg.objective.key_free_bits)
            record["swap_gap"] = batch_swap_gap(model, x)
            history.append(record)
            window.clear()
            if on_log:
                on_log(record)
    return history
