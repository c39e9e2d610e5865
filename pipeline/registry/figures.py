"""The figures of a registered model (jobs.generate, jobs.inspect): pick the episode, draw (kpp.viz), write PNGs.

An episode comes from prepared data (`--episode URL`: one of its fixed test episodes, `--index`; the data is
checked against the version's tags) or, with `--random`, a random fixed test episode of the data the version was
trained on (its `data.shards` tag). A `.npy` file of uint8 images [T, C, H, W] also works.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.registry import naming
from pipeline.registry.loading import Registered, RegistryError, check_data, data_card

GENERATE = {"prior": "samples_prior.png", "conditional": "conditional.png",
            "perturbation": "key_perturbation.png", "iterative": "iterative_inference.png"}
INSPECT = {"memory": "memory_keys.png", "sweep": "key_space.png"}


@dataclass
class Episode:
    images: torch.Tensor  # [1, T, C, H, W] floats
    where: str  # what it is, for the figure titles and the printout


def episode(reg: Registered, url: str = "", index: int = 0, random: bool = False, seed: int = 0) -> Episode:
    """One episode for the figures (see the module docstring); RegistryError naming what does not fit."""
    from pipeline.data.train_data import shard_eval_episodes
    from pipeline.urls import redact
    cfg = reg.model.cfg
    if cfg.kind != "kpp":
        raise RegistryError(f"{reg.label} is a {cfg.kind} baseline (memory.writer={cfg.memory.writer}): the figures "
                            f"need the K++ memory and its keys")
    if random or not url:
        url = reg.tags.get(naming.DATA_URL, "")
        if not url:
            raise RegistryError(f"{reg.label} records no data URL (tag {naming.DATA_URL}): give --episode URL")
    if url.endswith(".npy"):
        return _npy_episode(reg, url)
    card = data_card(url)
    check_data(reg, card, url)
    mode = reg.tags.get(naming.EPISODES_MODE, "random")
    count = -(-card.num_images["test"] // cfg.episode_length)
    if random:  # one of the first 64 fixed test episodes
        index = int(np.random.default_rng(seed).integers(0, max(1, min(count, 64))))
    episodes = shard_eval_episodes(url, "test", cfg.episode_length, index + 1, mode,
                                   int(reg.tags.get(naming.DATA_SEED, 0)))
    if random:
        index = min(index, episodes.shape[0] - 1)
    if index >= episodes.shape[0]:
        raise RegistryError(f"--index {index}: {redact(url)} has {episodes.shape[0]} {mode} test episodes")
    return Episode(episodes[index: index + 1], f"test episode {index} of {redact(url)}")


def _npy_episode(reg: Registered, path: str) -> Episode:
    from kpp.data import to_model_input
    cfg = reg.model.cfg
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RegistryError(f"--episode {path}: not a readable .npy file ({e})") from None
    x = x[None] if x.ndim == 4 else x
    if x.ndim != 5 or tuple(x.shape[2:]) != cfg.image_shape or x.dtype != np.uint8:
        raise RegistryError(f"--episode {path}: expected uint8 images [T, {', '.join(map(str, cfg.image_shape))}] "
                            f"for {reg.label}, got {x.dtype} {list(x.shape)}")
    try:
        return Episode(to_model_input(x[:1], cfg.bit_depth), f"the episode in {path}")
    except ValueError as e:
        raise RegistryError(f"--episode {path}: {e} (the model's bit depth is {cfg.bit_depth})") from None


def _title(reg: Registered, ep: Episode) -> str:
    return f"{reg.name} v{reg.version}, {ep.where}"


def generate(reg: Registered, ep: Episode, out: str | pathlib.Path, rounds: int = 3, samples: int = 4,
             perturbations: int = 5, std: float = 0.1, seed: int = 0) -> dict[str, dict]:
    """(a) samples with prior keys, (b) the episode beside reconstructions and samples from its memory, (c) key
    perturbation rows, (d) iterative inference rounds: one PNG each under `out`."""
    from kpp import viz
    out = pathlib.Path(out)
    m, x = reg.model, ep.images
    figs = {"prior": viz.prior_samples_figure(m, x, rows=samples, seed=seed),
            "conditional": viz.conditional_figure(m, x, samples=samples, seed=seed),
            "perturbation": viz.key_perturbation_figure(m, x, rows=perturbations, std=std, seed=seed),
            "iterative": viz.iterative_inference_figure(m, x, rounds=rounds, seed=seed)}
    return {k: _save(fig, out / GENERATE[k], _title(reg, ep)) for k, fig in figs.items()}


def inspect(reg: Registered, ep: Episode, out: str | pathlib.Path, seed: int = 0, grid: int = 7) -> dict[str, dict]:
    """The memory channels and the keys as boxes on the memory, and the sweep across the key space."""
    from kpp import viz
    out = pathlib.Path(out)
    m, x = reg.model, ep.images
    figs = {"memory": viz.memory_keys_figure(m, x, seed=seed), "sweep": viz.key_sweep_figure(m, x, n=grid)}
    return {k: _save(fig, out / INSPECT[k], _title(reg, ep)) for k, fig in figs.items()}


def _save(fig, path: pathlib.Path, subtitle: str) -> dict:
    """Write the PNG; returns its path and the figure's layout (rows, columns, labels) for the JSON summary."""
    from kpp import viz
    fig.text(0.995, 0.003, subtitle, ha="right", va="bottom", fontsize=6.5, color="0.4")
    return {"path": viz.save_figure(fig, path), **getattr(fig, "kpp_grid", {})}


def report(job: str, args, reg, ep, paths: dict) -> None:
    """Print the figures' paths and one JSON line, and write <out>/<job>.json."""
    import json
    import pathlib

    from pipeline.urls import redact_text
    print(f"{reg.label}, {redact_text(ep.where)}:")
    for fig in paths.values():
        print(f"  {fig['path']}")
    print(json.dumps({"model": args.model, "name": reg.name, "version": reg.version, "episode": redact_text(ep.where),
                      "figures": paths}))
    (pathlib.Path(args.out) / f"{job}.json").write_text(json.dumps(paths, indent=1) + "\n")
