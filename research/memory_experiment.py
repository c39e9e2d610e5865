"""Does the memory get used? Train one setting on binarized MNIST in-process and write its bounds as JSON.

    python -m research.memory_experiment --name key-warmup --source ../shared/data/binarized_mnist \
        --steps 1500 model.memory.writer=key model.objective.kl_warmup_steps=600 model.objective.key_free_bits=0.5

Reports, on fixed test episodes: the paper's memory-conditional -ELBO and its IWAE bound, KL_y per key, the paired
memory-swap gap and the leave-one-out bound (see kpp/evaluate.py). Results go to outputs/experiments/<name>.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from kpp import KanervaPlusPlus
from kpp.checkpoint import save_model
from kpp.data import to_model_input
from kpp.evaluate import describe, evaluate
from research.memory_report import plot_memory_samples
from pipeline.data.episodes import class_episodes, fixed_episodes
from pipeline.train.local import local_job, train_local
from pipeline.data.sources import load_split
from pipeline.train.config import ConfigError


# the in-process trainer's own names from before it took the job config, kept for the commands in the docs
ALIASES = {"train.steps": "train.max_steps", "train.batch_size": "data.batch_episodes",
           "train.lr_min_ratio": "train.min_lr_ratio", "train.seed": "seed", "train.episodes": "data.episodes"}


def job_overrides(pairs: list[str]) -> list[str]:
    """model.<field>=v and train.<field>=v (also data.<field>, seed) as the job config's overrides."""
    out = []
    for pair in pairs:
        key, value = pair.split("=", 1) if "=" in pair else (pair, None)
        if value is None or not key.startswith(("model.", "train.", "data.", "seed")):
            raise ConfigError(f"override {pair!r}: expected model.<field>=value or train.<field>=value")
        out.append(f"{ALIASES.get(key, key)}={value}")
    return out


def train_record(job) -> dict:
    """The training settings in the records' format (research.memory_report reads steps and batch_size)."""
    t = job.train
    return {"steps": t.max_steps, "batch_size": job.data.batch_episodes, "lr": t.lr, "warmup_steps": t.warmup_steps,
            "lr_min_ratio": t.min_lr_ratio, "grad_clip": t.grad_clip, "optimizer": t.optimizer, "seed": job.seed,
            "log_every": t.log_every, "episodes": job.data.episodes}


def device_name(device: torch.device) -> str:
    """What the run trained on, for tables and figures: the GPU's name, or the CPU's."""
    import platform
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--dataset", default="binarized_mnist")
    ap.add_argument("--source", default="../shared/data/binarized_mnist")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--binarize", action="store_true",
                    help="mnist/fashion_mnist: a fixed Bernoulli binarization that keeps the labels")
    ap.add_argument("--episodes", choices=("random", "class"), default="random",
                    help="random: T images of the shuffled split (the paper); class: T images of one class")
    ap.add_argument("--test-episodes", type=int, default=125, help="fixed test episodes (125 x 16 = 2,000 images)")
    ap.add_argument("--iwae-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="torch device to train and evaluate on (cpu, cuda, cuda:1)")
    ap.add_argument("--out", default="outputs/experiments")
    ap.add_argument("--samples", metavar="PNG",
                    help="also draw test episodes beside samples from their memories (labelled rows) into this PNG")
    ap.add_argument("overrides", nargs="*", help="model.<field>=v or train.<field>=v")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # checked before the data is read; the image shape comes from the data, the user's fields win
        overrides = [f"train.max_steps={args.steps}", f"data.episodes={args.episodes}",
                     *job_overrides(args.overrides)]
        local_job(overrides)
    except ConfigError as e:
        ap.error(str(e))
    options = {"binarize": True} if args.binarize else {}
    train = load_split(args.dataset, args.source, "train", **options)
    test = load_split(args.dataset, args.source, "test", **options)
    if args.episodes == "class" and (train.labels is None or test.labels is None):
        ap.error(f"--episodes class needs labels and {args.dataset} has none (try --dataset mnist --binarize)")
    c, h, w = train.image_shape
    job = local_job([f"model.image_channels={c}", f"model.image_height={h}", f"model.image_width={w}",
                     f"model.bit_depth={train.bit_depth}", *overrides])
    cfg = job.model
    torch.manual_seed(job.seed)
    model = KanervaPlusPlus(cfg).to(args.device)
    images = to_model_input(train.images, train.bit_depth)
    order = (fixed_episodes(len(test), cfg.episode_length, 1234) if args.episodes == "random"
             else class_episodes(test.labels, cfg.episode_length, 1234))
    test_x = to_model_input(test.images, test.bit_depth)[torch.from_numpy(order)]
    test_x = test_x[: args.test_episodes]
    start = time.perf_counter()
    history = train_local(model, images, job, labels=train.labels, on_log=lambda r: print(
        f"step {r['step']:5d} loss {r['loss']:.2f} -elbo {r['total']:.2f} kl_z {r['kl_z']:.2f} kl_y {r['kl_y']:.2f} swap {r['swap_gap']:+.2f} "
        f"beta {r['beta']:.2f} {r['seconds']:.0f}s", flush=True))
    train_seconds = time.perf_counter() - start
    result = evaluate(model, test_x, iwae_samples=args.iwae_samples, seed=0)
    print(describe(result))
    idle = history[-1]["keys_at_floor"]
    per_key = ", ".join(f"{result[f'kl_y_key{k}']:.2f}" for k in range(cfg.key_terms))
    print(f"KL_y per key (test): {per_key}; keys at the free-bits floor for the whole run: {idle or 'none'}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    record = {"name": args.name, "device": str(device), "device_name": device_name(device),
              "model_config": cfg.to_dict(), "train_config": train_record(job), "train_seconds": train_seconds,
              "test_images": int(test_x.shape[0] * test_x.shape[1]), "episodes": args.episodes,
              "dataset": args.dataset + ("-binarized" if args.binarize else ""), "keys_at_floor": idle,
              "test": result, "history": history}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    save_model(model, out / f"{args.name}.pt")
    if args.samples:
        labels = None if args.episodes == "random" else test.labels[order[: args.test_episodes, 0]]
        print(f"samples: {plot_memory_samples(model, test_x[:4], args.samples, labels)}")


if __name__ == "__main__":
    main()
