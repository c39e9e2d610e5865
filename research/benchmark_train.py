"""Benchmark (not a test): this Ray Train job against a plain torchrun DDP loop doing identical work.

    python -m research.benchmark_train [--steps 200] [--workers 2,1] [--out outputs/benchmarks/train.json]

Both sides: the same model, data (binarized MNIST held in memory, the same per-rank batches), optimiser,
N processes with gloo and 1 intra-op thread each, the same steps. The Ray side is `pipeline.cluster.driver.run` with
tracking off and one checkpoint at the end; the baseline is `plain_worker` below under torchrun, no checkpoints.
Reported as JSON, per worker count: the step-loop wall time of each and their ratio (goal <= 1.05; the median of
the paired ratios of `--repeats` interleaved runs, and the ratio of the best runs), the fixed start-up + tear-down
seconds (end-to-end wall minus loop), the seconds from launch to the end of the first step, episodes/s per worker,
peak RSS per worker (rank 0), the on-CPU share of the loop (training-thread CPU seconds / loop wall seconds,
rank 0), and whether both sides ended at the same loss (the check that the work was identical). The load average
is recorded: the machine may be shared.

Why two worker counts: with 2 workers on a 2-core machine the workers take every core, so every CPU-second
Ray's own processes use (controller, raylet, GCS, Train's helper actors, all polling) is taken from the loop;
with 1 worker a core is spare for them, as on a GPU node where the host CPUs are not the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from pipeline.net import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
# real data beside the repository (../shared/data), or KPP_SHARED_DATA, as for the tests
SHARED = pathlib.Path(os.environ.get("KPP_SHARED_DATA", REPO.parent / "shared" / "data")) / "binarized_mnist"
MODEL = {"episode_length": 8, "encoder": {"width": 16, "groups": 4, "embedding_dim": 64},
         "memory": {"channels": 32, "height": 16, "width": 16}, "read": {"window": 8},
         "latent": {"dim": 16, "prior_width": 32}, "decoder": {"width": 16, "groups": 4}}


def job_overrides(steps: int, storage: str, source: str, workers: int = 2) -> list[str]:
    return [f"model={json.dumps(MODEL)}", "name=bench", "data.dataset=binarized_mnist", f"data.source={source}",
            "data.batch_episodes=8", "data.valid_episodes=2", "data.test_episodes=2", "eval.iwae_samples=1",
            f"train.max_steps={steps}", f"train.warmup_steps={min(10, steps // 2)}", "train.log_every=50",
            f"checkpoint.every_steps={steps}", f"checkpoint.storage_path={storage}", "tracking.enabled=false",
            f"scaling.num_workers={workers}", "scaling.cpus_per_worker=0.49"]


def plain_worker(args) -> None:
    """The torchrun baseline: nothing but DDP steps over the same batches."""
    import torch
    import torch.distributed as dist

    from kpp.model import KanervaPlusPlus
    from kpp.objective import kl_beta
    from pipeline.train import config
    from pipeline.train import optim
    from pipeline.data.train_data import load_data
    from pipeline.train.loop import hash_seed, peak_rss_mb
    from pipeline.train.step import train_step
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config.load(None, job_overrides(args.steps, "/tmp", args.source, int(args.workers)))
    mcfg = cfg.model
    stream = load_data(cfg.data.dataset, cfg.data.source, mcfg.episode_length, cfg.data.batch_episodes, 2, 2,
                       cfg.seed, rank, world)[0]
    torch.manual_seed(cfg.seed)
    model = torch.nn.parallel.DistributedDataParallel(KanervaPlusPlus(mcfg))
    opt, sched = optim.build(model.parameters(), cfg.train)
    dist.barrier()
    t0, cpu0 = time.perf_counter(), time.thread_time()
    first_step_unix = None
    for step, batch in enumerate(stream.batches(stream.start(0))):
        if step == args.steps:
            break
        r = train_step(model, opt, sched, batch.images, beta=kl_beta(step, mcfg.objective),
                       grad_clip=cfg.train.grad_clip, noise_seed=hash_seed(cfg.seed, rank, step))
        first_step_unix = first_step_unix or time.time()
    loop_s = time.perf_counter() - t0
    loop_cpu_s = time.thread_time() - cpu0
    loss = r.terms["loss"].clone()
    dist.all_reduce(loss)  # the mean over ranks, as the Ray job reports it
    loss /= world
    dist.barrier()  # gloo: destroying the group right after the last collective can abort a rank
    if rank == 0:
        pathlib.Path(args.result).write_text(json.dumps({"loop_s": loop_s, "loop_cpu_s": loop_cpu_s,
                                                         "peak_rss_mb": peak_rss_mb(),
                                                         "launch_to_first_step_s": first_step_unix - args.launched,
                                                         "loss": loss.item()}))
    dist.destroy_process_group()


def run_torchrun(steps: int, source: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        result = pathlib.Path(d) / "r.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "research.benchmark_train",
                        "--worker", "--steps", str(steps), "--workers", str(workers), "--source", source,
                        "--result", str(result), "--launched", repr(time.time())],
                       cwd=REPO, check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        r = json.loads(result.read_text())
    return {"wall_s": wall, "loop_s": r["loop_s"], "fixed_s": wall - r["loop_s"], "peak_rss_mb_rank0": r["peak_rss_mb"],
            "on_cpu_share_rank0": r["loop_cpu_s"] / r["loop_s"], "launch_to_first_step_s": r["launch_to_first_step_s"],
            "final_loss": r["loss"]}


def run_ray(steps: int, source: str, workers: int) -> dict:
    # the launch time travels as the job's start: perf/start_to_first_step_s is then launch -> first step, as for
    # torchrun below (interpreter, imports, the local Ray cluster, the worker group, data, model, one step)
    code = ("import json,sys,time; t0=time.perf_counter(); from pipeline.train import config; from pipeline.cluster import driver; "
            "out=driver.run(config.load(None, json.loads(sys.argv[1])), "
            "driver.RunOptions(started=(float(sys.argv[2]), 'launch'))); "
            "print('RESULT', json.dumps({'wall_s': time.perf_counter()-t0, **out.metrics}))")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code, json.dumps(job_overrides(steps, d, source, workers)),
                            repr(time.time())], cwd=REPO,
                           capture_output=True, text=True, timeout=900,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""})
        wall = time.perf_counter() - t0  # includes the interpreter and imports, as torchrun's does
    if p.returncode != 0:
        raise SystemExit(p.stderr[-4000:])
    m = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    return {"wall_s": wall, "loop_s": m["perf/loop_s"], "fixed_s": wall - m["perf/loop_s"],
            "peak_rss_mb_rank0": m["perf/peak_rss_mb"], "on_cpu_share_rank0": m["perf/loop_cpu_s"] / m["perf/loop_s"],
            "launch_to_first_step_s": m["perf/start_to_first_step_s"], "final_loss": m["train/loss"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps of each run")
    ap.add_argument("--source", default=str(SHARED), help="binarized MNIST directory")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side per worker count")
    ap.add_argument("--workers", default="2,1", help="comma-separated worker (process) counts to compare at")
    ap.add_argument("--out", default="outputs/benchmarks/train.json", help="where the JSON goes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        plain_worker(args)
        return {}
    load_before = os.getloadavg()
    report = {"steps": args.steps, "threads_per_worker": 1, "episodes_per_step_per_worker": 8, "model": MODEL,
              "device": "cpu", "cpu_count": os.cpu_count(), "goal_loop_time_ratio": 1.05, "by_workers": {}}
    for workers in [int(w) for w in args.workers.split(",")]:
        report["by_workers"][str(workers)] = compare(args.steps, args.source, workers, args.repeats)
    report["loadavg_before_after"] = [load_before, os.getloadavg()]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def compare(steps: int, source: str, workers: int, repeats: int) -> dict:
    runs = {"torchrun": [], "ray_train": []}
    for _ in range(repeats):  # interleaved, so drifting background load hits both sides alike
        runs["torchrun"].append(run_torchrun(steps, source, workers))
        runs["ray_train"].append(run_ray(steps, source, workers))
    paired = sorted(r["loop_s"] / t["loop_s"] for t, r in zip(runs["torchrun"], runs["ray_train"]))
    best = {k: min(v, key=lambda r: r["loop_s"]) for k, v in runs.items()}  # least disturbed run of each
    summary = {k: {"loop_s": b["loop_s"], "fixed_s": min(r["fixed_s"] for r in runs[k]),
                   "launch_to_first_step_s": min(r["launch_to_first_step_s"] for r in runs[k]),
                   "episodes_per_s_per_worker": steps * 8 / b["loop_s"], "peak_rss_mb_rank0": b["peak_rss_mb_rank0"],
                   "on_cpu_share_rank0": b["on_cpu_share_rank0"]}
               for k, b in best.items()}
    return {
        "workers": workers,
        "loop_time_ratio_ray_over_torchrun": paired[len(paired) // 2],  # median of the paired runs
        "loop_time_ratio_paired": paired,
        "loop_time_ratio_best_over_best": summary["ray_train"]["loop_s"] / summary["torchrun"]["loop_s"],
        "fixed_overhead_s": {k: v["fixed_s"] for k, v in summary.items()},
        "launch_to_first_step_s": {k: v["launch_to_first_step_s"] for k, v in summary.items()},
        "summary_best_of_repeats": summary,
        "same_final_loss": all(abs(r["final_loss"] - runs["torchrun"][0]["final_loss"]) < 1e-3
                               for rs in runs.values() for r in rs),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
