"""The demo: train Kanerva++ in-process on real data that installs with the project, print the test bounds, and
write a PNG grid of generations. Offline, a few minutes on 2 CPU cores.

    python -m jobs.demo                                   # scikit-learn's bundled digits, binarized to 28x28
    python -m jobs.demo --source ../shared/data/binarized_mnist   # or any standard dataset dir / fsspec URL
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from kpp import KanervaConfig, KanervaPlusPlus
from kpp.checkpoint import save_model
from kpp.data import to_model_input
from kpp.evaluate import describe, evaluate
from kpp.viz import ROW_LABELS, save_sample_grid
from pipeline.data.episodes import class_episodes, fixed_episodes
from pipeline.train.local import local_job, train_local
from pipeline.data.sources import DATASETS, load_split

# Small enough for a few CPU minutes; the objective settings are the ones that made the memory matter in
# docs/memory-experiments.md.
DEMO_MODEL = {
    "episode_length": 8,
    "encoder": {"width": 16, "groups": 4, "embedding_dim": 64},
    "memory": {"channels": 32, "height": 16, "width": 16, "writer": "key"},  # the code memory: 2 x latent.dim
    "read": {"window": 8},
    "latent": {"dim": 16, "prior_width": 32},
    "decoder": {"width": 16, "groups": 4},
    "objective": {"kl_warmup_steps": 240},  # 40% of the run, as the recipe; key free bits 0.5 (default)
}


def infer_dataset(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if name not in DATASETS:
        raise SystemExit(f"cannot tell the dataset from {source!r}: pass --dataset (one of {', '.join(DATASETS)})")
    return name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="dataset directory or fsspec URL (default: bundled digits)")
    ap.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default: from --source's name)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (episodes of 8 images, 8 per step)")
    ap.add_argument("--test-episodes", type=int, default=24, help="fixed test episodes to evaluate on")
    ap.add_argument("--iwae-samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/demo", help="where the model, bounds and sample grid go")
    args = ap.parse_args(argv)
    dataset = args.dataset or ("digits" if args.source is None else infer_dataset(args.source))

    train, test = (load_split(dataset, args.source, split) for split in ("train", "test"))
    c, h, w = train.image_shape
    kind = "bernoulli" if train.bit_depth == 1 else "logistic_mixture"
    cfg = KanervaConfig.from_dict({**DEMO_MODEL, "image_channels": c, "image_height": h, "image_width": w,
                                   "bit_depth": train.bit_depth, "likelihood": {"kind": kind}}).validate()
    torch.manual_seed(args.seed)
    model = KanervaPlusPlus(cfg)
    images = to_model_input(train.images, train.bit_depth)
    # Episodes of one class where the data has labels (as make demo): the memory then carries what they share.
    episodes = "class" if train.labels is not None and test.labels is not None else "random"
    order = (fixed_episodes(len(test), cfg.episode_length, seed=1234) if episodes == "random"
             else class_episodes(test.labels, cfg.episode_length, seed=1234))
    order = torch.from_numpy(order)[: args.test_episodes]
    test_x = to_model_input(test.images, test.bit_depth)[order]
    print(f"demo: {train.name} ({len(train)} images) -> {test.name}, {args.steps} steps, {episodes} episodes", flush=True)

    start = time.perf_counter()
    job = local_job([f"train.max_steps={args.steps}", "data.batch_episodes=8", "train.lr=2e-3",
                     f"train.warmup_steps={min(20, args.steps // 4)}",
                     f"seed={args.seed}", f"data.episodes={episodes}"])
    train_local(model, images, job, labels=train.labels,
                on_log=lambda r: print(f"  step {r['step']:4d}  -elbo {r['total']:8.2f}  KL_z {r['kl_z']:6.2f}  "
                                       f"KL_y {r['kl_y']:6.2f}  swap gap {r['swap_gap']:+6.2f}  {r['seconds']:5.0f}s",
                                       flush=True))
    result = evaluate(model, test_x, iwae_samples=args.iwae_samples, seed=args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.pt")
    grid = save_sample_grid(model, test_x[:1], out / "samples.png", seed=args.seed)
    result["train_seconds"] = time.perf_counter() - start
    (out / "bounds.json").write_text(json.dumps({"dataset": train.name, **result}, indent=1))
    print(f"\ntest bounds on {result['num_images']} images of {len(order)} fixed episodes ({test.name}):")
    print(describe(result))
    print(f"\nsample grid: {grid}  (rows: {', '.join(ROW_LABELS)})")
    print(f"model: {out / 'model.pt'}")
    return result


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    main()
