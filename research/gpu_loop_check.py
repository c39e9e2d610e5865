"""Device check (not a test): the training loop's images/s against the bare training step, on one GPU, in one call.

    python -m research.gpu_loop_check --data ../shared/data/binarized_mnist [--steps 600] [--out outputs/benchmarks/gpu_loop.json]

Needs only torch and numpy (no Ray, MLflow or pyarrow), so it runs on a bare GPU box. Two measurements in the same
process, on the same device, at the paper's shape (32 episodes x 32 binarized MNIST images, kpp's default model):
  - step: `train_step` alone on one batch already on the GPU (what jobs.gpu_speed measures), 30 timed steps;
  - loop: `pipeline.train.loop.Loop` with a LocalSession, the training split held in memory, metrics every
    `log_every` steps, validation and a local checkpoint every 200 steps, under torch.cuda.set_sync_debug_mode
    ("warn"): every host sync the loop makes between log steps is counted (the target is one per log_every).
Reported: images/s of both and `loop_over_step` (target >= 0.8). On a machine without CUDA it runs the same on the
CPU (a smoke check of the script itself; the ratio then means little).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
import warnings


TINY = ["model.episode_length=4", "data.batch_episodes=2", "data.valid_episodes=2", "data.test_episodes=2",
        "model.encoder={width: 4, groups: 2, embedding_dim: 16}", "model.decoder={width: 4, groups: 2}",
        "model.memory={channels: 8, height: 8, width: 8}", "model.read.window=4",
        "model.latent={dim: 4, prior_width: 8}"]


def step_speed(cfg, x, steps: int) -> float:
    """Seconds per train_step of a fresh model on one batch already on the device."""
    import torch

    from kpp.model import KanervaPlusPlus
    from pipeline.train import optim
    from pipeline.train.step import train_step
    torch.manual_seed(0)
    model = KanervaPlusPlus(cfg.model).to(x.device)
    opt, sched = optim.build(model.parameters(), cfg.train)
    for _ in range(3):
        train_step(model, opt, sched, x, beta=1.0, grad_clip=cfg.train.grad_clip)
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, sched, x, beta=1.0, grad_clip=cfg.train.grad_clip)
    sync(x.device)
    return (time.perf_counter() - t0) / steps


def random_data(cfg):
    """(train stream, valid, test) of random binary 28 x 28 images, for the Loop's `data`."""
    import numpy as np

    from pipeline.data.train_data import InMemoryStream, eval_episodes
    rng = np.random.default_rng(0)
    split = (rng.random((50_000, 1, 28, 28)) < 0.13).astype(np.uint8)
    T, d = cfg.model.episode_length, cfg.data
    return (InMemoryStream(split, 1, T, d.batch_episodes, cfg.seed, 0, 1),
            eval_episodes(split[:10_000], 1, T, d.valid_episodes, cfg.eval.seed),
            eval_episodes(split[10_000:20_000], 1, T, d.test_episodes, cfg.eval.seed))


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m research.gpu_loop_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a binarized_mnist directory (the standard .amat files), or "
                    "'random': 50,000 random binary images (speed does not depend on the pixels; for a GPU box "
                    "without the data)")
    ap.add_argument("--steps", type=int, default=600, help="steps of the loop")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--out", default="outputs/benchmarks/gpu_loop.json")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few eval episodes: a smoke run of this "
                    "script on a CPU (tests/test_benchmark_smoke.py)")
    args = ap.parse_args(argv)
    if args.data != "random" and not pathlib.Path(args.data).is_dir():
        ap.error(f"--data: no such directory: {args.data}")
    import torch

    from pipeline.train import config
    from pipeline.train.loop import LocalSession, Loop
    from pipeline.train.resolve import resolved
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = resolved(config.load(None, [
        "name=gpu-loop", "data.dataset=binarized_mnist", f"data.source={'' if args.data == 'random' else args.data}",
        "model.episode_length=32", "model.image_height=28", "model.image_width=28", "model.bit_depth=1",
        "data.batch_episodes=32", "data.valid_episodes=64", "data.test_episodes=32", "eval.iwae_samples=2",
        "eval.every_steps=200", f"train.max_steps={args.steps}", f"train.warmup_steps={min(50, args.steps // 2)}",
        f"train.log_every={args.log_every}", "checkpoint.every_steps=200", "checkpoint.keep_by=recent",
        "tracking.enabled=false", "scaling.num_workers=1", f"scaling.use_gpu={'true' if cuda else 'false'}",
        *(TINY if args.tiny else [])]))
    B, T = cfg.data.batch_episodes, cfg.model.episode_length
    x = torch.bernoulli(torch.full((B, T, 1, 28, 28), 0.13)).to(device)
    step_s = step_speed(cfg, x, 30)
    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop(cfg, LocalSession(tmp), data=random_data(cfg) if args.data == "random" else None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.run()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
    loop_step_s = loop.loop_s / args.steps
    images = B * T
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "steps": args.steps, "log_every": args.log_every, "step_ms": step_s * 1e3,
              "loop_ms_per_step": loop_step_s * 1e3, "step_images_per_s": images / step_s,
              "loop_images_per_s": images / loop_step_s, "loop_over_step": step_s / loop_step_s,
              "host_syncs_warned": len(syncs), "host_syncs_per_log_window": len(syncs) / max(1, args.steps // args.log_every),
              "sync_examples": syncs[:5]}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
