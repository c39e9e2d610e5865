"""The training loop without Ray: the same config, Loop, data and checkpoints, one process per GPU under torchrun.

    torchrun --nproc-per-node 1 -m jobs.torchrun_train --config jobs/configs/mnist_gpu.yaml \
        data.shards=/data/bmnist checkpoint.storage_path=/tmp/kpp scaling.num_workers=1 tracking.enabled=false

For a single GPU box, a debugger, or measuring the step without Ray's processes around it. nccl on GPUs, gloo on
CPU; checkpoints as folders under <checkpoint.storage_path>/<name> (local paths only), and a re-run resumes from
the newest. No MLflow here unless tracking.uri is set. Prints one JSON line: the last metrics, images/s per
process (median of the logged windows after the first) and the peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun ... -m jobs.torchrun_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    from pipeline.train import config
    from pipeline.job_env import job_start
    from pipeline.train.loop import LocalSession, Loop
    try:
        cfg = config.load(args.config, args.overrides)
        from pipeline.train.resolve import resolved
        cfg = resolved(cfg)
    except config.ConfigError as e:
        print(f"jobs.torchrun_train: invalid config: {e}", file=sys.stderr)
        return 2
    if "://" in cfg.checkpoint.storage_path:
        print("jobs.torchrun_train: checkpoint.storage_path: a local path here (S3 checkpoints go through Ray Train: "
              "jobs.train)", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "RANK" in os.environ:
        dist.init_process_group("nccl" if cfg.scaling.use_gpu else "gloo")
    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        print("jobs.torchrun_train: scaling.use_gpu=true but torch sees no GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    session = LocalSession(f"{cfg.checkpoint.storage_path}/{cfg.name}")
    loop = Loop(cfg, session, tracking_uri=cfg.tracking.uri if cfg.tracking.enabled else "",
                started_unix=job_start()[0])
    last = loop.run()
    rates = [r["perf/images_per_s"] for r in session.reports if "perf/images_per_s" in r][1:]
    if session.rank == 0:
        out = {"world_size": session.world_size, "device": str(loop.device), "precision": cfg.train.precision,
               "steps": loop.step, "images_per_step": cfg.data.batch_episodes * cfg.model.episode_length * session.world_size,
               "images_per_s_per_process": statistics.median(rates) / session.world_size if rates else None,
               "start_to_first_step_s": loop.start_to_first_step_s,
               "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
               **{k: v for k, v in last.items() if isinstance(v, (int, float)) and (k.startswith("test/") or
                                                                                  k.startswith("valid"))}}
        print(json.dumps(out), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
