"""Spread an evaluation over Ray workers: each task evaluates a run of whole batches of the test episodes
(kpp.evaluate.episode_bounds with the batches' own seeds and the next episode as the swap partner), and the
per-episode values are put back in order. The numbers equal a one-process evaluation's.

Used by pipeline.registry.evaluation (jobs.evaluate --workers N). Connects to RAY_ADDRESS or the cluster this
process already joined, else starts a local one.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


def _evaluate_slice(state_dict, config: dict[str, Any], episodes: torch.Tensor, partner: torch.Tensor,
                    first_batch: int, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    from kpp.config import KanervaConfig
    from kpp.evaluate import episode_bounds
    from kpp.model import KanervaPlusPlus
    model = KanervaPlusPlus(KanervaConfig.from_dict(config))
    model.load_state_dict(state_dict)
    out = episode_bounds(model.eval(), episodes, partner=partner, first_batch=first_batch, **kwargs)
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


def plan(num_episodes: int, batch_size: int, workers: int) -> list[tuple[int, int, int]]:
    """(first episode, end episode, first batch index) of each task: contiguous runs of whole batches, as even as
    the batches allow; at most one task per batch."""
    batches = -(-num_episodes // batch_size)
    tasks = max(1, min(workers, batches))
    bounds = np.linspace(0, batches, tasks + 1).round().astype(int)
    return [(int(a) * batch_size, min(int(b) * batch_size, num_episodes), int(a))
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def connect(workers: int) -> None:
    import ray
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        from pipeline.cluster.loopback import node_context
        with node_context(os.environ["RAY_ADDRESS"]):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    from pipeline.cluster.loopback import loopback_node
    with loopback_node():  # auth is off: listen on 127.0.0.1 only
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                 log_to_driver=False)


def episode_values_on_ray(state_dict, config: dict[str, Any], episodes: torch.Tensor, *, workers: int,
                          iwae_samples: int, seed: int, leave_one_out: bool, batch_size: int,
                          cpus_per_task: float = 1.0) -> dict[str, np.ndarray]:
    import ray
    connect(workers)
    task = ray.remote(num_cpus=cpus_per_task, max_retries=1)(_evaluate_slice)
    state_ref = ray.put({k: v.cpu() for k, v in state_dict.items()})
    kwargs = {"iwae_samples": iwae_samples, "seed": seed, "leave_one_out": leave_one_out, "batch_size": batch_size}
    n = episodes.shape[0]
    refs = [task.remote(state_ref, config, episodes[a:b].clone(), episodes[b % n: b % n + 1].clone(), first, kwargs)
            for a, b, first in plan(n, batch_size, workers)]
    parts = ray.get(refs)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
