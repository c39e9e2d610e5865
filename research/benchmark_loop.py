"""Benchmark (not a test): what the training loop costs beyond the training step, as it will show on a GPU.

    python -m jobs.benchmark --profile loop            # the same as: python -m research.benchmark_loop
    python -m research.benchmark_loop [--steps 400] [--repeats 9] [--interleaved] [--out outputs/benchmarks]

Two loops over the same batches, side by side in one run, on one worker with one thread:
  - full: the real path, `pipeline.cluster.driver.run` (Ray Train, one worker) with binarized MNIST shards read
    from an S3 endpoint by one DataLoader worker (as the GPU configs do, with 2), metrics to a real MLflow server
    every `log_every` steps, validation and checkpoints to the S3 endpoint on their step schedules: the loop's
    `perf/loop_s` (from the first batch in hand to the end of the last step; the baseline validation and the
    loader's start-up before it, `perf/first_batch_wait_s`, reported beside, and the final test bound after it
    are not part of the loop, as the bare loop's batches are read before its clock starts);
  - bare: `train_step` over the same batches, read from the same shards once and held in memory, same model,
    seed, optimiser and noise seeds, nothing else; run just before and just after each full loop, and averaged:
    by default in the full loop's own worker, thread and core, seconds before its first step and after its last
    report is stored (research.loop_probe.BracketedLoop); `--bare-in driver` runs them in this process instead,
    ~20 s of Ray Train start-up away on either side, where this VM's drift (the two sides of one pair differed by
    up to 20%) and the driver process's own speed weighed in each pair.
Both sides run on the same core, and nothing else does: this process, and so everything it starts (the S3 and
MLflow stand-ins, Ray's daemons, actors and workers, which inherit the mask), runs on the other cores, and the
full loop's training thread claims the top core as a reserved one (scaling.pin_training_thread with
scaling.training_cores: a node started with `taskset -c <the rest> ray start`); the bare loops run on that core
too. Why: this VM's two cores differ in speed by 10% and more, changing by the minute (measured interleaved), so
which core each side landed on weighed in the ratio; and on two cores the node's own work landed on the
training core in the middle of the full loop (a Ray worker starting takes 1-2 s of CPU; a sampler of per-thread
CPU time found Ray workers starting up and the DataLoader worker's start-up using 10-20% of the training core
while a full run was up), where a GPU node has cores to spare for it. `--services-on-all-cores` leaves it all
free on every core (the training thread claims the top core, the services the rest). `--pin-training-thread off`
measures the unpinned loop against an unpinned bare loop; `alternate` does both (no core reserved in either).
The model is tiny and its batch is sized on this CPU (`--batch-episodes auto`, the default: the number of episodes
whose bare step comes nearest `--target-step-ms`, 10 ms, on the training core, timed before the run) so that a step
costs about what a GPU step of the paper's model does (~12 ms on an H100), and the loop's own overhead weighs as it
would there: with a fixed batch the step drifted with the model's and the machine's speed (11.7 ms in stop 29,
6.2 ms by stop 36 on the same EPYC after the fused optimisers and the code memory, 23-35 ms on a Xeon). Reported: `loop_over_bare` (full loop time
per step / bare loop time per step, the median of the paired repeats), the overhead in ms per step, the ratio that
overhead gives at a 10 ms step, and where the full loop stalled: the longest checkpoint and validation steps
(perf/checkpoint_stall_s, perf/state_copy_s), the data wait and the first batch's wait, and the overhead split in
two: `step_in_loop_over_bare` (train_step's own time inside the full loop over the bare loop's: the same step run
slower by the process around it) and `loop_own_ms_per_step` (what the loop does between steps), with the training
thread's context switches per step. `--interleaved` also times bare steps inside the full loop's worker, in turn
with the loop's own, over the same batches (research.loop_probe): `loop_over_bare_interleaved`, free of the machine's drift and of what
the run puts beside the step. The services (moto's S3 server, an MLflow server)
are started here on 127.0.0.1 and stopped at the end. Writes <out>/loop.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KPP_SHARED_DATA", REPO.parent / "shared" / "data")) / "binarized_mnist"
EPISODE_LENGTH = 4
# batch sizes tried by --batch-episodes auto, smallest first (each timed for CALIBRATION_STEPS steps)
BATCH_EPISODES_CANDIDATES = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CALIBRATION_STEPS = 40
# Width 4 and one read: the smallest K++ whose step is still the model's (convolutions, the STN read, the
# write); below it the per-op overhead of the CPU kernels sets the step time, not the model.
MODEL = {"episode_length": EPISODE_LENGTH, "encoder": {"width": 4, "groups": 2, "embedding_dim": 16},
         "memory": {"channels": 8, "height": 8, "width": 8}, "keys": {"num_reads": 1},  # code: 2 x d_z
         "read": {"window": 4}, "latent": {"dim": 4, "prior_width": 8}, "decoder": {"width": 4, "groups": 2},
         "objective": {"kl_warmup_steps": 50}}


def job_overrides(args, shards: str, storage: str, uri: str, name: str, pin: bool = False,
                  reserved_core: int | None = None) -> list[str]:
    return [f"model={json.dumps(MODEL)}", f"name={name}", "data.dataset=binarized_mnist", f"data.shards={shards}",
            f"data.batch_episodes={args.batch_episodes}", f"data.loader_workers={args.loader_workers}",
            f"data.valid_episodes={args.valid_episodes}", f"scaling.pin_training_thread={str(pin).lower()}",
            "data.test_episodes=4",
            "eval.iwae_samples=1", f"eval.every_steps={args.eval_every}", f"train.max_steps={args.steps}",
            "train.warmup_steps=10", f"train.log_every={args.log_every}",
            f"checkpoint.every_steps={args.checkpoint_every}", f"checkpoint.storage_path={storage}",
            "checkpoint.keep=2", "checkpoint.keep_by=recent", f"tracking.uri={uri}", "tracking.experiment=loop-bench",
            "tracking.registered_model=", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
            *([f"scaling.training_cores={reserved_core}"] if pin and reserved_core is not None else []),
            *getattr(args, "set", [])]


def bare_loop(cfg, batches: list, core: int | None = None) -> dict[str, float]:
    """train_step over batches already in memory, with the loop's garbage collection schedule (train.gc_every):
    the model's own speed in this process (1 thread); on `core`
    alone where given (the core the full loop's pinned training thread takes: this machine's two cores differ
    in speed by 10% and more, and which one each side got would otherwise weigh in the ratio)."""
    if core is not None:
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {core})
        try:
            return bare_loop(cfg, batches)
        finally:
            os.sched_setaffinity(0, allowed)
    from pipeline.train.gc_schedule import GcSchedule
    from research.loop_probe import bare_train
    # the loop's garbage collection schedule here too (train.gc_every): like with like
    with GcSchedule(cfg.train.gc_every) as collector:
        return bare_train(cfg, cfg.model, batches, collector)


def nearest_batch(step_ms: dict[int, float], target_ms: float) -> int:
    """Of the batch sizes timed in increasing order (episodes -> bare step, ms), the one nearest `target_ms` by
    ratio: the smallest reaching it, or the largest below it if that is nearer; the largest timed if none reaches."""
    above = [e for e in step_ms if step_ms[e] >= target_ms]
    below = [e for e in step_ms if step_ms[e] < target_ms]
    if not above:
        return below[-1]
    if below and target_ms / step_ms[below[-1]] < step_ms[above[0]] / target_ms:
        return below[-1]
    return above[0]


def calibrate_batch(args, core: int | None) -> tuple[int, dict[int, float]]:
    """Time the bare step (median of the last 3/4 of CALIBRATION_STEPS, on `core`) at each candidate batch size
    until one reaches `args.target_step_ms`, and pick the nearest (nearest_batch). Random binary images of the
    benchmark's shape: the step's cost does not depend on the pixels."""
    import torch

    from pipeline.train import config
    timed: dict[int, float] = {}
    for episodes in BATCH_EPISODES_CANDIDATES:
        cfg = config.load(None, job_overrides(argparse.Namespace(**{**vars(args), "batch_episodes": episodes}),
                                              "/unused", "/unused", "sqlite:///unused.db", "calibration"))
        g = torch.Generator().manual_seed(0)
        batches = [torch.rand(episodes, EPISODE_LENGTH, 1, 28, 28, generator=g).gt(0.5).float()
                   for _ in range(CALIBRATION_STEPS)]
        at = bare_loop(cfg, batches, core)["at"]
        first = CALIBRATION_STEPS // 4
        timed[episodes] = statistics.median(b - a for a, b in zip(at[first:], at[first + 1:])) * 1e3
        if timed[episodes] >= args.target_step_ms:
            break
    return nearest_batch(timed, args.target_step_ms), timed


def move_tree(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` and of its descendants onto `cores` (a thread that ends meanwhile is
    skipped)."""
    from pipeline.train import affinity
    for tid in affinity.tree_threads(pid):
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass


def full_history(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """The full loop's perf metrics by step, from the MLflow server."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
            for k in ("perf/loop_s", "perf/checkpoint_stall_s", "perf/state_copy_s", "perf/checkpoint_room_wait_s",
                      "perf/checkpoints_skipped",
                      "perf/data_wait_s",
                      "perf/first_batch_wait_s", "perf/step_host_s", "perf/context_switches_per_step",
                      "probe/bare_at_s")}


def bare_in_worker(uri: str, run_id: str, history: dict[str, dict[int, float]], steps: int) -> dict[str, Any]:
    """The two bare loops a BracketedLoop ran beside its step loop, as bare_loop reports one (their mean), from the
    run's probe/* metrics; `at` is known at the log steps only (what the window ratios read)."""
    from mlflow.tracking import MlflowClient
    pm = MlflowClient(uri).get_run(run_id).data.metrics
    before, after = pm["probe/bare_before_s"], pm["probe/bare_after_s"]
    at = [float("nan")] * steps
    for k, v in history["probe/bare_at_s"].items():
        at[k - 1] = v
    at[-1] = (before + after) / 2
    return {"loop_s": (before + after) / 2, "at": at, "sides_s": [before, after],
            "loop_cpu_s": (pm["probe/bare_before_cpu_s"] + pm["probe/bare_after_cpu_s"]) / 2,
            "final_loss": pm["probe/bare_final_loss"]}


def window_total(per_step: dict[int, float]) -> float:
    """A per-step window mean logged at each log step, summed back over the steps of its windows."""
    total, previous = 0.0, 0
    for step in sorted(per_step):
        total += per_step[step] * (step - previous)
        previous = step
    return total


def read_batches(cfg, count: int) -> list:
    """The first `count` training batches of rank 0 of 1, as the full loop's stream yields them."""
    from pipeline.data.train_data import ShardStream
    stream = ShardStream(cfg.data.shards, cfg.model.episode_length, cfg.data.batch_episodes, cfg.seed, 0, 1)
    out, cursor = [], stream.start(0)
    while len(out) < count:
        for batch in stream.batches(cursor):
            out.append(batch.images)
            if len(out) == count:
                break
        cursor = stream.start(cursor.epoch + 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m research.benchmark_loop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps of each loop")
    ap.add_argument("--repeats", type=int, default=9, help="paired (bare, full) runs; the median ratio is reported "
                    "(this shared machine has slow phases of a minute or more that hit either side of a pair: pairs "
                    "spread by +-10%% on the 2-vCPU Xeon, so 5 pairs left the median to luck)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every of the full loop")
    ap.add_argument("--eval-every", type=int, default=100, help="eval.every_steps of the full loop")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint.every_steps of the full loop")
    ap.add_argument("--valid-episodes", type=int, default=8, help="data.valid_episodes of the full loop")
    ap.add_argument("--batch-episodes", default="auto",
                    help="data.batch_episodes of both loops (episodes of 4 images per step), or auto: sized on this "
                         "CPU so the bare step comes nearest --target-step-ms (the issue's ~10 ms, a GPU step's cost)")
    ap.add_argument("--target-step-ms", type=float, default=10.0, help="the bare step --batch-episodes auto aims at")
    ap.add_argument("--loader-workers", type=int, default=1, help="data.loader_workers of the full loop (the GPU "
                    "configs use 2; 0 reads the shards on the training thread)")
    ap.add_argument("--pin-training-thread", choices=("off", "on", "alternate"), default="on",
                    help="scaling.pin_training_thread of the full loop (on: the bare loops run on the same core "
                         "as the pinned training thread); alternate: off and on in turn, pair by pair, so both "
                         "settings meet the same phases of the machine")
    ap.add_argument("--services-on-all-cores", action="store_true",
                    help="leave Ray and the S3 and MLflow stand-ins free to run on every core (by default, with "
                         "the pin on, the top core is reserved for the training thread and the bare loops, and "
                         "everything else runs on the other cores, as on a GPU node with cores to spare; with the "
                         "pin off or alternating, the S3 and MLflow stand-ins are kept off the top core)")
    ap.add_argument("--bare-in", choices=("worker", "driver"), default=None,
                    help="where the bare loops run: worker (the default): in the full loop's own Ray worker, right "
                         "before and right after its step loop, same thread and core (research.loop_probe."
                         "BracketedLoop); driver: in this process before and after each full run, ~20 s of Ray "
                         "Train start-up away (the measure up to stop 36; --interleaved uses it)")
    ap.add_argument("--interleaved", action="store_true",
                    help="also time bare train_steps inside the full loop's worker: a chunk of them over the same "
                         "batches after every chunk of the loop's (research.loop_probe), same thread and core, so the "
                         "machine's drift and what the run puts beside the step cancel "
                         "(reported as loop_over_bare_interleaved; the full loop's own timings then carry the "
                         "probe, and the paired ratio is not comparable to a run without it)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of both loops after the benchmark's own (repeatable), e.g. "
                         "checkpoint.every_steps=0 to measure the loop without checkpoints")
    ap.add_argument("--out", default="outputs/benchmarks", help="directory for loop.json")
    args = ap.parse_args(argv)
    for name in ("steps", "repeats", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_episodes != "auto":
        try:
            args.batch_episodes = int(args.batch_episodes)
        except ValueError:
            ap.error(f"--batch-episodes must be auto or a positive integer, not {args.batch_episodes!r}")
        if args.batch_episodes < 1:
            ap.error("--batch-episodes must be >= 1")
    if args.bare_in is None:
        args.bare_in = "driver" if args.interleaved else "worker"
    if args.interleaved and args.bare_in == "worker":
        ap.error("--interleaved pairs its runs with bare loops in the driver: --bare-in driver")
    if args.target_step_ms <= 0:
        ap.error("--target-step-ms must be > 0")
    if not SHARED.is_dir():
        ap.error(f"binarized MNIST not found at {SHARED} (set KPP_SHARED_DATA)")

    import torch

    from infra.local_stack import BUCKETS, S3_KEY, S3_REGION, S3_SECRET, MlflowServer, S3Server
    from pipeline.cluster import driver
    from pipeline.data.shards.prepare import PrepareConfig, prepare
    from pipeline.train import affinity, config
    torch.set_num_threads(1)  # the same as the Ray worker (scaling.cpus_per_worker=1)
    started, load_start = time.perf_counter(), os.getloadavg()
    saved_env = dict(os.environ)
    # the core a pinned training thread claims (pipeline.train.affinity: the highest free one)
    own_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    training_core = sorted(own_cores)[-1] if own_cores else None
    several_cores = len(own_cores) > 1
    reserved_core = (training_core if args.pin_training_thread == "on" and not args.services_on_all_cores
                     and several_cores else None)
    calibration: dict[int, float] = {}
    if args.batch_episodes == "auto":
        # on the core the bare loops and the training thread take, before anything else runs beside it
        args.batch_episodes, calibration = calibrate_batch(args, training_core)
        print(f"[loop] batch: {args.batch_episodes} episodes x {EPISODE_LENGTH} images (bare step by episodes: "
              + ", ".join(f"{e}: {ms:.2f} ms" for e, ms in calibration.items()) + ")", flush=True)
    if reserved_core is not None:
        # this process and all it starts from here on (services, Ray) off the reserved core; given back at the end
        move_tree(os.getpid(), own_cores - {reserved_core})
    with tempfile.TemporaryDirectory() as tmp:
        s3, mlflow = S3Server(pathlib.Path(tmp) / "s3"), MlflowServer(pathlib.Path(tmp) / "mlflow")
        try:
            s3.start()
            s3.create_buckets(BUCKETS)
            mlflow.start()
            services_off_top_core = (reserved_core is not None
                                     or (not args.services_on_all_cores and several_cores))
            if services_off_top_core and reserved_core is None:
                # the S3 and MLflow stand-ins off the training core: in production they run on other machines
                for service in (s3, mlflow):
                    move_tree(service.proc.pid, own_cores - {training_core})
            # claims of this run's own (the Ray workers inherit it): a claim held by some other process on this
            # machine would send the pinned thread to another core than the bare loops'
            os.environ[affinity.CLAIMS_DIR_ENV] = str(pathlib.Path(tmp) / "core-claims")
            os.environ.update({"AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": S3_KEY,
                               "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": S3_REGION,
                               "RAY_AUTH_MODE": "disabled"})
            shards = "s3://kpp-data/binarized_mnist"
            prepare(PrepareConfig(dataset="binarized_mnist", source=str(SHARED), out=shards,
                                  episode_length=EPISODE_LENGTH, progress=False))
            base = config.load(None, job_overrides(args, shards, "s3://kpp-runs/ray", mlflow.url, "loop-0"))
            base = driver.resolved(base)
            # the bare loops' batches, held in memory: read here for bare loops in this process; a BracketedLoop
            # reads its own in the worker
            batches = read_batches(base, args.steps) if args.bare_in == "driver" else None
            # the local cluster up before the first bare loop, as it is for every later one: its daemons take
            # CPU beside either loop (the first bare loop before it ran 20% faster than the next ones)
            driver.connect(base)
            runs = []
            for repeat in range(args.repeats):
                pin = args.pin_training_thread == "on" or (args.pin_training_thread == "alternate"
                                                           and repeat % 2 == 1)
                core = training_core if pin else None
                cfg = config.load(None, job_overrides(args, shards, "s3://kpp-runs/ray", mlflow.url,
                                                      f"loop-{repeat}", pin, reserved_core))
                from research import loop_probe
                if args.bare_in == "worker":
                    outcome = driver.run(cfg, driver.RunOptions(progress=False, worker=loop_probe.bracketed_worker))
                    history = full_history(mlflow.url, outcome.run_id)
                    bare = bare_in_worker(mlflow.url, outcome.run_id, history, args.steps)
                else:
                    before = bare_loop(base, batches, core)
                    worker = loop_probe.probe_worker if args.interleaved else None
                    outcome = driver.run(cfg, driver.RunOptions(progress=False, worker=worker))
                    after = bare_loop(base, batches, core)
                    history = full_history(mlflow.url, outcome.run_id)
                    # the bare loop on both sides of the full one, averaged: this shared machine drifts by 20-40%
                    # over a minute, and one bare run before the full one carried all of that into the pair's ratio
                    bare = {"loop_s": (before["loop_s"] + after["loop_s"]) / 2,
                            "loop_cpu_s": (before["loop_cpu_s"] + after["loop_cpu_s"]) / 2,
                            "at": [(a + b) / 2 for a, b in zip(before["at"], after["at"])],
                            "final_loss": before["final_loss"], "sides_s": [before["loop_s"], after["loop_s"]]}
                m = outcome.metrics
                full_s = float(m["perf/loop_s"])
                # steady state: from the first log step at or after a quarter of the run (Ray's own processes
                # and actors are still starting beside the first steps) to the last log step
                k0 = min(s for s in history["perf/loop_s"] if s >= args.steps // 4)
                k1 = max(history["perf/loop_s"])
                step_host_s = window_total(history["perf/step_host_s"])  # train_step's time in the full loop
                full_steady = (history["perf/loop_s"][k1] - history["perf/loop_s"][k0]) / (k1 - k0)
                bare_steady = (bare["at"][k1 - 1] - bare["at"][k0 - 1]) / (k1 - k0)
                # the pair's ratio window by window (eval_every steps each): where in the run the full loop lost
                # its time (one-time costs early in the job, or all along)
                edges = sorted(s for s in history["perf/loop_s"] if s % args.eval_every == 0)
                window_ratios = {b: (history["perf/loop_s"][b] - (history["perf/loop_s"][a] if a else 0.0))
                                 / (bare["at"][b - 1] - (bare["at"][a - 1] if a else 0.0))
                                 for a, b in zip([0, *edges], edges)}
                stalls, copies = history["perf/checkpoint_stall_s"], history["perf/state_copy_s"]
                room_waits = history["perf/checkpoint_room_wait_s"]
                probe, probe_wall_s = {}, 0.0
                if args.interleaved:
                    from mlflow.tracking import MlflowClient
                    pm = MlflowClient(mlflow.url).get_run(outcome.run_id).data.metrics
                    probe_wall_s = pm["probe/bare_wall_s"]  # inside the loop's clock, between its steps
                    bare_step_s = pm["probe/bare_wall_s"] / pm["probe/bare_steps"]
                    # the loop's time without the probe's chunks, over as many steps at the probe's bare speed
                    probe = {"loop_over_bare_interleaved": (full_s - pm["probe/bare_wall_s"])
                             / (args.steps * bare_step_s),
                             "step_in_loop_over_bare_interleaved": pm["probe/step_in_loop_over_bare"],
                             # the same in wall time: above the CPU-time ratio, the loop's steps waited (for the
                             # GIL, held by the report or MLflow thread) where the probe's did not
                             "step_in_loop_over_bare_interleaved_wall": step_host_s / (args.steps * bare_step_s),
                             "step_in_loop_over_bare_interleaved_quartiles": [pm["probe/step_in_loop_over_bare_q1"],
                                                                              pm["probe/step_in_loop_over_bare_q3"]],
                             "interleaved_bare_ms_per_step": bare_step_s * 1e3,
                             # the bare model trains the loop's trajectory: the same last loss (same work)
                             "interleaved_bare_final_loss": pm["probe/bare_final_loss"]}
                runs.append({**probe, "pin_training_thread": pin, "bare_loop_s": bare["loop_s"],
                             "bare_loop_s_before_after": bare["sides_s"],
                             "full_loop_s": full_s,
                             "ratio": full_s / bare["loop_s"], "steady_steps": [k0, k1],
                             "full_loop_cpu_s": float(m["perf/loop_cpu_s"]), "bare_loop_cpu_s": bare["loop_cpu_s"],
                             "cpu_ratio": float(m["perf/loop_cpu_s"]) / bare["loop_cpu_s"],
                             "steady_ratio": full_steady / bare_steady, "window_ratios": window_ratios,
                             "bare_final_loss": bare["final_loss"],
                             "full_final_loss": m["train/loss"],
                             "checkpoint_stall_s": stalls, "state_copy_s": copies, "checkpoint_room_wait_s": room_waits,
                             # checkpoint.when_behind=skip: checkpoints due while two reports were still in flight
                             "checkpoints_skipped": max(history["perf/checkpoints_skipped"].values(), default=0),
                             "data_wait_s_per_step": sum(history["perf/data_wait_s"].values()) / args.steps,
                             "first_batch_wait_s": history["perf/first_batch_wait_s"].get(0, 0.0),
                             # the same with the loader's start-up counted in: once per job, so it weighs
                             # steps / job steps of this in a real run (600 here, 24,400 in paper_mnist.yaml)
                             "ratio_with_loader_start": (full_s + history["perf/first_batch_wait_s"].get(0, 0.0))
                             / bare["loop_s"],
                             # where the full loop's extra time goes: the step itself running slower in the
                             # worker (the process around it), or the loop's own work between steps
                             "step_in_loop_over_bare": step_host_s / bare["loop_s"],
                             "loop_own_ms_per_step": (full_s - probe_wall_s - step_host_s
                                                      - sum(history["perf/data_wait_s"].values())) / args.steps * 1e3,
                             "context_switches_per_step": window_total(history["perf/context_switches_per_step"])
                             / args.steps,
                             "full_metrics": {k: v for k, v in m.items() if k.startswith(("perf/", "train/loss"))}})
                print(f"[loop] repeat {repeat}{' (pinned)' if pin else ''}: bare "
                      f"{bare['loop_s'] / args.steps * 1e3:.2f} ms/step, full "
                      f"{full_s / args.steps * 1e3:.2f} ms/step, ratio {runs[-1]['ratio']:.3f}, steps {k0}-{k1}: "
                      f"{runs[-1]['steady_ratio']:.3f}; checkpoint stall max {max(stalls.values()) * 1e3:.1f} ms, "
                      f"state copy max {max(copies.values()) * 1e3:.1f} ms, room wait max "
                      f"{max(room_waits.values(), default=0.0) * 1e3:.1f} ms, "
                      f"{runs[-1]['checkpoints_skipped']:.0f} skipped; train_step in the loop / bare "
                      f"{runs[-1]['step_in_loop_over_bare']:.3f}, the loop's own {runs[-1]['loop_own_ms_per_step']:.2f} "
                      f"ms/step, {runs[-1]['context_switches_per_step']:.2f} context switches/step", flush=True)
        finally:
            import ray
            if ray.is_initialized():
                ray.shutdown()
            mlflow.stop()
            s3.stop()
            os.environ.clear()  # a caller in this process keeps its own endpoint and credentials
            os.environ.update(saved_env)
            if reserved_core is not None:
                move_tree(os.getpid(), own_cores)
    ratio = statistics.median(r["ratio"] for r in runs)
    bare_ms = statistics.median(r["bare_loop_s"] for r in runs) / args.steps * 1e3
    overhead_ms = statistics.median((r["full_loop_s"] - r["bare_loop_s"]) / args.steps * 1e3 for r in runs)
    report = {
        "command": "python -m research.benchmark_loop " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": args.steps, "log_every": args.log_every, "eval_every_steps": args.eval_every,
        "checkpoint_every_steps": args.checkpoint_every, "valid_episodes": args.valid_episodes,
        "model": MODEL, "batch": f"{args.batch_episodes} episodes x {EPISODE_LENGTH} images of 28 x 28, 1 thread",
        "batch_episodes": args.batch_episodes, "target_step_ms": args.target_step_ms,
        # --batch-episodes auto: the bare step, ms, of each size tried before the run (empty: given)
        "batch_calibration_ms": calibration,
        "bare_ms_per_step": bare_ms, "loop_over_bare": ratio, "overhead_ms_per_step": overhead_ms,
        "loop_over_bare_steady": statistics.median(r["steady_ratio"] for r in runs),
        "loop_over_bare_runs": [r["ratio"] for r in runs],
        # all pairs' full loop time over all pairs' bare loop time: every step weighs the same
        "loop_over_bare_pooled": sum(r["full_loop_s"] for r in runs) / sum(r["bare_loop_s"] for r in runs),
        "loop_over_bare_quartiles": (statistics.quantiles([r["ratio"] for r in runs], n=4)[::2]
                                     if len(runs) > 1 else [runs[0]["ratio"]] * 2),
        "loop_over_bare_cpu": statistics.median(r["cpu_ratio"] for r in runs),
        "checkpoint_stall_ms_max": max(max(r["checkpoint_stall_s"].values()) for r in runs) * 1e3,
        "state_copy_ms_max": max(max(r["state_copy_s"].values()) for r in runs) * 1e3,
        # the checkpoint whose stall most exceeds its own state copy, and how much of that was the wait for room
        # among the reports in flight (Ray's controller or the store slower than the schedule)
        "checkpoint_stall_over_copy_worst": max(
            ({"repeat": i, "step": s, "stall_ms": r["checkpoint_stall_s"][s] * 1e3,
              "state_copy_ms": r["state_copy_s"][s] * 1e3, "room_wait_ms": r["checkpoint_room_wait_s"].get(s, 0.0) * 1e3}
             for i, r in enumerate(runs) for s in r["checkpoint_stall_s"]),
            key=lambda w: w["stall_ms"] - w["state_copy_ms"]),
        "checkpoints_skipped": sum(r["checkpoints_skipped"] for r in runs),
        "loop_over_bare_with_loader_start": statistics.median(r["ratio_with_loader_start"] for r in runs),
        "data_wait_ms_per_step": statistics.median(r["data_wait_s_per_step"] for r in runs) * 1e3,
        "first_batch_wait_s": statistics.median(r["first_batch_wait_s"] for r in runs),
        "loop_over_bare_at_10ms_step": 1 + overhead_ms / 10.0,
        "step_in_loop_over_bare": statistics.median(r["step_in_loop_over_bare"] for r in runs),
        "loop_own_ms_per_step": statistics.median(r["loop_own_ms_per_step"] for r in runs),
        "context_switches_per_step": statistics.median(r["context_switches_per_step"] for r in runs),
        "pin_training_thread": args.pin_training_thread,
        # where the bare loops ran: in the full loop's worker, right before and after its step loop, or here
        "bare_in": args.bare_in,
        "interleaved": args.interleaved,
        **({"loop_over_bare_interleaved": statistics.median(r["loop_over_bare_interleaved"] for r in runs),
            "step_in_loop_over_bare_interleaved": statistics.median(r["step_in_loop_over_bare_interleaved"]
                                                                    for r in runs)} if args.interleaved else {}),
        "services_off_top_core": services_off_top_core,
        # the top core reserved for the training thread (scaling.training_cores) and the bare loops; Ray, S3 and
        # MLflow on the rest; None: not reserved
        "reserved_training_core": reserved_core,
        "gc_every": base.train.gc_every,  # the garbage collection schedule of both loops
        # each setting's median pair ratio, where both ran (--pin-training-thread alternate)
        "loop_over_bare_by_pin": {k: statistics.median(r["ratio"] for r in runs if r["pin_training_thread"] == v)
                                  for k, v in (("off", False), ("on", True))
                                  if any(r["pin_training_thread"] == v for r in runs)},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "elapsed_min": (time.perf_counter() - started) / 60,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loop.json").write_text(json.dumps(report, indent=1, default=str))
    if args.interleaved:
        print(f"[loop] interleaved in the worker: loop / bare {report['loop_over_bare_interleaved']:.3f}, train_step in "
              f"the loop / bare {report['step_in_loop_over_bare_interleaved']:.3f} (medians over the runs)")
    q1, q3 = report["loop_over_bare_quartiles"]
    print(f"[loop] pairs {', '.join(f'{r:.3f}' for r in report['loop_over_bare_runs'])}: quartiles {q1:.3f}-{q3:.3f}, "
          f"pooled {report['loop_over_bare_pooled']:.3f}")
    print(f"[loop] loop_over_bare {ratio:.3f}, steady {report['loop_over_bare_steady']:.3f} (bare {bare_ms:.2f} ms/step, overhead {overhead_ms:.2f} ms/step: "
          f"{1 + overhead_ms / 10:.3f} at a 10 ms step); wrote {out / 'loop.json'}")
    return report


if __name__ == "__main__":
    main()
