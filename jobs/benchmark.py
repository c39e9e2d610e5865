"""Benchmark (not a test): Kanerva++ beside its baselines, measured the same way, and how fast each trains.

    python -m jobs.benchmark --profile cpu-small          # this 2-core machine, under 30 minutes
    python -m jobs.benchmark --profile gpu                # one GPU; the same under `ray job submit`
    python -m jobs.benchmark --profile tiny               # seconds: what the smoke test runs
    python -m jobs.benchmark --profile loop               # the training loop against bare train_step (research.benchmark_loop)

Writes outputs/benchmarks/<profile>.json and <profile>.md (the Markdown tables the README quotes).

Quality at equal budget: the rows of the paper's table this codebase runs (MODELS): K++ (memory.writer=key),
DKM w/ TSM (writer=dkm), DKM (writer=dkm, encoder.shift_fraction=0: a per-image conv encoder), KM (writer=km, the
same plain conv encoder), the VAE (writer=vae) and K++ with nothing written to its memory (writer=none, the ablation
the memory must beat), the same encoder and decoder otherwise, trained from the same
seed on the same batches of binarized MNIST (and Fashion-MNIST), each
scored twice on the same fixed test episodes: after the same number of steps, and after the same wall-clock
training time (the clock stops while evaluating). Bounds (kpp/evaluate.py): the memory-conditional -ELBO (the
paper's quantity), its IWAE bound and the leave-one-out -ELBO, in nats/image (binarized) or bits/dim (8-bit).

Speed: training images/s per worker of each model (interleaved repeats, the median), the K++/VAE step-time ratio
(the memory's overhead) from the same run; a torch.profiler breakdown of one K++ step (encoder, write, STN read +
prior, decoder, likelihood, backward, optimiser); the shard reader's supply against what training consumes; and
(CPU profiles) Ray Train against plain torchrun on identical work, with 1 and 2 workers, peak memory per worker,
the fixed start-up cost and launch to first step, from research.benchmark_train. The load average is recorded: these
machines are shared.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KPP_SHARED_DATA", REPO.parent / "shared" / "data"))
REFERENCE = REPO.parent / "shared" / "reference" / "kpp_ref" / "kpp.py"

# The rows: each model is a few fields of the same config apart (kpp/config.py: memory.writer; shift_fraction=0
# turns the TSM encoder into a per-image conv net, as in DKM and KM's own papers), overriding the profile's model.
MODELS = {
    "kpp": {"memory": {"writer": "key"}},
    "dkm": {"memory": {"writer": "dkm"}},
    "dkm_plain": {"memory": {"writer": "dkm"}, "encoder": {"shift_fraction": 0.0}},
    "km": {"memory": {"writer": "km"}, "encoder": {"shift_fraction": 0.0}},
    "vae": {"memory": {"writer": "vae"}},
    # the ablation K++ must beat: the same model, keys and prior, with nothing written to its memory
    "none": {"memory": {"writer": "none"}},
}
LABELS = {"kpp": "K++", "dkm": "DKM w/ TSM", "dkm_plain": "DKM", "km": "KM", "vae": "VAE", "none": "K++, no memory"}
DATASETS = {"binarized_mnist": "binarized_mnist", "fashion_mnist": "fashion_mnist"}
TINY_MODEL = {"episode_length": 4, "encoder": {"width": 8, "groups": 4, "embedding_dim": 32},
              "memory": {"channels": 16, "height": 8, "width": 8, "slots": 8, "address_dim": 8},
              "keys": {"num_reads": 2},
              "read": {"window": 4}, "latent": {"dim": 8, "prior_width": 16}, "decoder": {"width": 8, "groups": 4}}


@dataclass
class Profile:
    model: dict[str, Any] = field(default_factory=dict)   # overrides of kpp's defaults (every model)
    batch: int = 16                                       # episodes per step
    steps: dict[str, int] = field(default_factory=dict)   # dataset -> steps (the equal-steps budget)
    seconds: dict[str, float] = field(default_factory=dict)  # dataset -> training seconds (equal wall clock)
    lr: float = 1e-3
    test_episodes: int = 32
    iwae_samples: int = 16
    threads: int = 2                                      # torch intra-op threads of the in-process runs
    device: str = "cpu"
    precision: str = "fp32"                               # bf16: autocast on a GPU
    speed_steps: int = 8                                  # timed steps per repeat, per model
    speed_repeats: int = 3
    profile_steps: int = 2
    loader: bool = True                                   # shard reader supply
    ray_workers: tuple[int, ...] = (1, 2)                 # Ray Train vs torchrun (CPU, gloo); () skips
    ray_steps: int = 40
    ray_repeats: int = 1
    gpus: int = 0                                         # GPUs this profile needs
    reference: bool = False                               # time ../shared/reference/kpp_ref beside the models


PROFILES = {
    "tiny": Profile(model=TINY_MODEL, batch=2, steps={"binarized_mnist": 3, "fashion_mnist": 2},
                    seconds={"binarized_mnist": 0.5, "fashion_mnist": 0.3}, test_episodes=2, iwae_samples=2,
                    threads=1, speed_steps=2, speed_repeats=1, profile_steps=1, ray_workers=(1,), ray_steps=2),
    # kpp's default model at 16 episodes x 16 images per step, KL warm-up over 40% of the steps; about 20
    # minutes on 2 shared cores for K++, DKM w/ TSM and the VAE (the rows DKM and KM come on top). One thread: on
    # these shared cores a second thread was slower, not faster (docs/speed.md). A few hundred steps is far from
    # the ~1,000 steps K++ needs to pick its memory up (docs/memory-experiments.md): this profile checks the
    # pipeline and the speed, not the paper's numbers.
    "cpu-small": Profile(steps={"binarized_mnist": 250, "fashion_mnist": 60},
                         seconds={"binarized_mnist": 150.0, "fashion_mnist": 35.0},
                         model={"objective": {"kl_warmup_steps": 100}}, threads=1, reference=True),
    # One GPU: the authors' episode shape (32 x 32 images). fp32: bf16 autocast was not faster on an H100 for this
    # small model (13.1 vs 12.5 ms per step, outputs/benchmarks/gpu_speed.json); precision="bf16" switches it on.
    # Sized for one 10-minute device call from the H100 step times (K++ 12.5, DKM 59.5, VAE 9.3 ms): each model
    # trains max(its steps, its seconds), about 270 s on binarized MNIST and 90 s on Fashion-MNIST for the three.
    # DKM and KM (not timed on a GPU yet) write image by image like DKM w/ TSM, so all five rows do not fit one
    # call: run --models kpp,dkm,vae, then --models dkm_plain,km.
    "gpu": Profile(model={"episode_length": 32, "objective": {"kl_warmup_steps": 1200}}, batch=32,
                   steps={"binarized_mnist": 3000, "fashion_mnist": 1000},
                   seconds={"binarized_mnist": 45.0, "fashion_mnist": 15.0}, lr=5e-4, test_episodes=128,
                   iwae_samples=64, threads=8, device="cuda", speed_steps=30, ray_workers=(),
                   gpus=1),
}


class BenchmarkError(SystemExit):
    """Bad input, refused before anything trains (exit status 2)."""

    def __init__(self, message: str):
        print(f"jobs.benchmark: error: {message}", file=sys.stderr)
        super().__init__(2)


def model_config(name: str, bit_depth: int, image_shape: tuple[int, int, int], prof: Profile):
    from kpp import KanervaConfig

    from kpp.config import WRITER_FIELDS

    c, h, w = image_shape
    over = json.loads(json.dumps(prof.model))  # deep copy
    for section, fields in MODELS[name].items():
        over[section] = {**over.get(section, {}), **fields}
    # A profile sizes the matrix memory (memory.slots, ...) once for every row; a row whose writer has no use for a
    # setting leaves it out (validate() refuses settings that would do nothing).
    for setting, writers in WRITER_FIELDS.items():
        if over["memory"]["writer"] not in writers:
            over["memory"].pop(setting, None)
    return KanervaConfig.from_dict({"image_channels": c, "image_height": h, "image_width": w, "bit_depth": bit_depth,
                                    "likelihood": {"kind": "bernoulli" if bit_depth == 1 else "logistic_mixture"},
                                    **over}).validate()


def load(dataset: str, prof: Profile, episode_length: int):
    from kpp.data import to_model_input
    from pipeline.data.episodes import fixed_episodes
    from pipeline.data.sources import load_split

    source = str(SHARED / DATASETS[dataset])
    train, test = load_split(dataset, source, "train"), load_split(dataset, source, "test")
    images = to_model_input(train.images, train.bit_depth)
    order = torch.from_numpy(fixed_episodes(len(test), episode_length, 1234))[: prof.test_episodes]
    return images, to_model_input(test.images, test.bit_depth)[order], train.bit_depth, train.image_shape


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def trainer(cfg, prof: Profile, steps: int):
    from kpp import KanervaPlusPlus
    from pipeline.train import optim
    from pipeline.train.local import local_job

    torch.manual_seed(0)
    model = KanervaPlusPlus(cfg).to(prof.device)
    tcfg = local_job([f"train.max_steps={steps}", f"data.batch_episodes={prof.batch}", f"train.lr={prof.lr}",
                      f"train.warmup_steps={min(50, steps // 4)}"]).train
    optimizer, scheduler = optim.build(model.parameters(), tcfg)
    return model, optimizer, scheduler, tcfg


def quality(name: str, dataset: str, data, prof: Profile) -> dict:
    """Train one model; score it at the equal-steps and at the equal-seconds budget (whichever comes first is
    scored first; the run goes on to the other)."""
    from kpp.evaluate import evaluate
    from kpp.objective import kl_beta
    from pipeline.train.local import episode_batches
    from pipeline.train.step import train_step

    images, test_x, bit_depth, shape = data
    cfg = model_config(name, bit_depth, shape, prof)
    steps, seconds = prof.steps[dataset], prof.seconds[dataset]
    model, optimizer, scheduler, tcfg = trainer(cfg, prof, steps)
    batches = episode_batches(images, cfg.episode_length, prof.batch, 0)
    out: dict[str, Any] = {"model": name, "dataset": dataset, "unit": cfg.unit}
    train_s, step, first_loss = 0.0, 0, None
    model.train()
    while "equal_steps" not in out or "equal_time" not in out:
        x = next(batches).to(prof.device, non_blocking=True)
        sync(prof.device)
        t0 = time.perf_counter()
        r = train_step(model, optimizer, scheduler, x, beta=kl_beta(step, cfg.objective), grad_clip=tcfg.grad_clip,
                       precision=prof.precision)
        sync(prof.device)
        train_s += time.perf_counter() - t0
        if not r.ok:
            raise FloatingPointError(f"{name} on {dataset}: non-finite loss or gradient at step {step}")
        first_loss = first_loss if first_loss is not None else float(r.terms["total"])
        step += 1
        for budget, due in (("equal_steps", step >= steps), ("equal_time", train_s >= seconds)):
            if due and budget not in out:
                result = evaluate(model, test_x.to(prof.device), iwae_samples=prof.iwae_samples, seed=0)
                out[budget] = {"steps": step, "train_s": train_s, "images_per_s": step * x.shape[0] * x.shape[1] / train_s,
                               "train_total_first_step": first_loss, "train_total_last_step": float(r.terms["total"]),
                               **{k: v for k, v in result.items() if not k.startswith("kl_y_key")}}
                print(f"  {LABELS[name]:10s} {dataset:15s} {budget:11s} step {step:5d} {train_s:7.1f}s "
                      f"chain {result['chain_neg_elbo']:.3f} LOO {result['loo_neg_elbo']:.3f} "
                      f"memory-conditional {result['neg_elbo']:.3f} IWAE {result['iwae']:.3f} "
                      f"swap {result['swap_gap']:+.3f} {cfg.unit}", flush=True)
    return out


def reference_step(batch: int, length: int):
    """A training step of the reference prototype (../shared/reference/kpp_ref/kpp.py, K++ with its `atkey`
    writer, as its README runs it), or None where it is not beside the repository. It sets 2 threads on import."""
    if not REFERENCE.exists():
        return None
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("kpp_ref_prototype", REFERENCE)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ref.KPP(writer="atkey")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x):
        terms = {k: v.mean() for k, v in model.loss(x, per_key=True).items() if k != "kly_k"}
        loss = terms["rec"] + 0.5 * (terms["klz"] + terms["kly"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def speed(data, prof: Profile, models: list[str]) -> dict:
    """Steps/s of each model at the profile's batch, fresh models, repeats interleaved so drifting load hits all
    alike; median over repeats. CPU seconds per step too (less sensitive to other jobs on a shared machine)."""
    from kpp.objective import kl_beta
    from pipeline.train.local import episode_batches
    from pipeline.train.step import train_step

    images, _, bit_depth, shape = data
    steppers = {}
    for name in models:
        cfg = model_config(name, bit_depth, shape, prof)
        model, optimizer, scheduler, tcfg = trainer(cfg, prof, 1000)
        steppers[name] = (lambda x, m=model, o=optimizer, s=scheduler, c=cfg:
                          train_step(m, o, s, x, beta=0.5, grad_clip=10.0, precision=prof.precision))
    length = model_config(models[0], bit_depth, shape, prof).episode_length
    if prof.reference and prof.device == "cpu" and bit_depth == 1 and tuple(shape) == (1, 28, 28):
        ref = reference_step(prof.batch, length)
        if ref is not None:
            steppers["reference"] = ref
    batches = episode_batches(images, length, prof.batch, 1)
    fixed = [next(batches).to(prof.device) for _ in range(prof.speed_steps)]
    for name, step in steppers.items():  # warm-up (allocator, oneDNN primitive caches, cuDNN autotune)
        for x in fixed[:2]:
            step(x)
    wall: dict[str, list[float]] = {n: [] for n in steppers}
    cpu: dict[str, list[float]] = {n: [] for n in steppers}
    for _ in range(prof.speed_repeats):
        for name, step in steppers.items():
            sync(prof.device)
            w0, c0 = time.perf_counter(), time.process_time()
            for x in fixed:
                step(x)
            sync(prof.device)
            wall[name].append((time.perf_counter() - w0) / len(fixed))
            cpu[name].append((time.process_time() - c0) / len(fixed))
    images_per_step = prof.batch * length
    out = {name: {"s_per_step": statistics.median(wall[name]), "cpu_s_per_step": statistics.median(cpu[name]),
                  "images_per_s": images_per_step / statistics.median(wall[name]), "runs_s_per_step": wall[name]}
           for name in steppers}
    ratios = {}
    if "kpp" in out and "vae" in out:
        ratios["kpp_over_vae_step_time"] = out["kpp"]["s_per_step"] / out["vae"]["s_per_step"]
        ratios["kpp_over_vae_cpu_time"] = out["kpp"]["cpu_s_per_step"] / out["vae"]["cpu_s_per_step"]
    if "kpp" in out and "reference" in out:
        ratios["kpp_over_reference_step_time"] = out["kpp"]["s_per_step"] / out["reference"]["s_per_step"]
    return {"images_per_step": images_per_step, "threads": torch.get_num_threads(), "models": out, "ratios": ratios}


def profile_step(data, prof: Profile, name: str = "kpp") -> dict:
    """torch.profiler over `profile_steps` training steps of one model, time split by part of the step (the
    model's own methods wrapped in record_function ranges on this instance only)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from kpp.objective import kl_beta
    from pipeline.train.local import episode_batches

    images, _, bit_depth, shape = data
    cfg = model_config(name, bit_depth, shape, prof)
    model, optimizer, scheduler, tcfg = trainer(cfg, prof, 1000)
    parts = {"encode": "encoder (+ key and z heads)", "write": "write", "read_prior": "STN read + prior p(z | reads)",
             "decode": "decoder"}
    for attr, label in parts.items():
        if hasattr(model, attr):
            def wrapped(*a, _f=getattr(model, attr), _label=label, **k):
                with record_function(_label):
                    return _f(*a, **k)
            setattr(model, attr, wrapped)
    nll = model.likelihood.nll

    def likelihood(*a, **k):
        with record_function("likelihood"):
            return nll(*a, **k)
    model.likelihood.nll = likelihood
    x = next(episode_batches(images, cfg.episode_length, prof.batch, 2)).to(prof.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if prof.precision == "bf16" else contextlib.nullcontext())

    def step():
        with record_function("forward (all)"):
            with autocast:
                out = model(x, beta=kl_beta(0, cfg.objective))
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            out["loss"].backward()
        with record_function("optimiser (clip + Adam)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
        sync(prof.device)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prof.device.startswith("cuda") else [])
    with profile(activities=activities) as p:
        for _ in range(prof.profile_steps):
            step()
    totals = {e.key: e for e in p.key_averages()}
    labels = list(parts.values()) + ["likelihood", "forward (all)", "backward", "optimiser (clip + Adam)"]
    attr = "device_time_total" if prof.device.startswith("cuda") else "cpu_time_total"
    ms = {k: getattr(totals[k], attr) / 1000 / prof.profile_steps for k in labels if k in totals}
    step_ms = ms.get("forward (all)", 0) + ms.get("backward", 0) + ms.get("optimiser (clip + Adam)", 0)
    top = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"model": name, "ms_per_step": ms, "step_ms": step_ms, "clock": attr,
            "top_ops_self_cpu_ms": {e.key: e.self_cpu_time_total / 1000 / prof.profile_steps for e in top}}


def loader_supply(prof: Profile, length: int, tmp: str) -> dict:
    """Images/s the shard reader delivers (binarized MNIST shards on local disk, 0 DataLoader workers: what one
    training process gets without helpers)."""
    from research.benchmark_data import measure
    from pipeline.data.shards.prepare import PrepareConfig, prepare
    from pipeline.data.shards.reader import StreamConfig

    root = f"{tmp}/binarized_mnist"
    prepare(PrepareConfig(dataset="binarized_mnist", source=str(SHARED / "binarized_mnist"), out=root,
                          splits=("train",), progress=False))
    run = measure(StreamConfig(root=root, episode_length=length, batch_size=prof.batch), 0, 1, "fork")
    return {"images_per_s": run["best_epoch_images_per_s"], "steady_images_per_s": run["best_steady_images_per_s"]}


def ray_vs_torchrun(prof: Profile) -> dict:
    from research import benchmark_train

    out = {"model": benchmark_train.MODEL, "steps": prof.ray_steps, "by_workers": {}}
    for workers in prof.ray_workers:
        r = benchmark_train.compare(prof.ray_steps, str(SHARED / "binarized_mnist"), workers, prof.ray_repeats)
        r.pop("runs", None)
        out["by_workers"][str(workers)] = r
    return out


def check(prof: Profile, profile_name: str, models: list[str], datasets: list[str]) -> None:
    """Everything that would fail later, refused now."""
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise BenchmarkError(f"unknown model {', '.join(unknown) or '(none)'}: choose from {', '.join(MODELS)}")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise BenchmarkError(f"unknown dataset {', '.join(unknown)}: choose from {', '.join(DATASETS)}")
    for d in datasets:
        if not (SHARED / DATASETS[d]).is_dir():
            raise BenchmarkError(f"dataset {d} not found at {SHARED / DATASETS[d]} (set KPP_SHARED_DATA)")
    cpus = os.cpu_count() or 1
    if prof.ray_workers and max(prof.ray_workers) > cpus:
        raise BenchmarkError(f"profile {profile_name} asks for {max(prof.ray_workers)} workers; this machine has "
                             f"{cpus} CPU cores (one worker per core)")
    if prof.gpus:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < prof.gpus:
            raise BenchmarkError(f"profile {profile_name} needs {prof.gpus} GPU(s); this machine has {have}")
    for m in models:  # every config must build
        for d in datasets:
            try:
                model_config(m, 1 if d == "binarized_mnist" else 8, (1, 28, 28), prof)
            except ValueError as e:
                raise BenchmarkError(f"model {m} on {d}: {e}") from None


def markdown(report: dict) -> str:
    lines = [f"# Benchmark: profile `{report['profile']}`", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']['description']}; load average {report['machine']['loadavg_start'][0]:.1f} "
             f"at the start, {report['machine']['loadavg_end'][0]:.1f} at the end (a shared machine: compare only "
             f"numbers from one run). {report['elapsed_min']:.1f} minutes.", ""]
    lines += ["## Quality at equal budget", "",
              "The chain -ELBO (x_t under a memory of the images before it: a proper bound on -ln p(X)/T) and its "
              "IWAE bound, the leave-one-out -ELBO (x_t under a memory of the other T-1 images), the "
              "memory-conditional -ELBO (x_t in its own memory: the paper's quantity) and its IWAE bound, and the "
              "paired memory-swap gap, on the same fixed test episodes.", ""]
    for dataset, runs in report["quality"].items():
        unit = next(iter(runs.values()))["unit"]
        lines += [f"**{dataset}** ({unit}; {report['profile_config']['batch']} episodes x "
                  f"{report['episode_length']} images per step)", "",
                  "| model | budget | steps | train s | chain -ELBO | chain IWAE | LOO -ELBO | memory-conditional "
                  "-ELBO | IWAE | swap gap | KL_z | KL_y | KL_M |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for budget, label in (("equal_steps", "equal steps"), ("equal_time", "equal time")):
            for name, run in runs.items():
                r = run[budget]
                lines.append(f"| {LABELS[name]} | {label} | {r['steps']} | {r['train_s']:.0f} | "
                             f"{r.get('chain_neg_elbo', math.nan):.3f} | {r.get('chain_iwae', math.nan):.3f} | "
                             f"{r['loo_neg_elbo']:.3f} | {r['neg_elbo']:.3f} | "
                             f"{r['iwae']:.3f} | {r['swap_gap']:+.3f} | {r['kl_z']:.3f} | "
                             f"{r['kl_y']:.3f} | {r.get('kl_m', 0.0):.3f} |")
        lines.append("")
    s = report.get("speed")
    if s:
        lines += ["## Training speed (one process)", "",
                  f"{s['images_per_step']} images per step, {s['threads']} threads, median of interleaved repeats.", "",
                  "| model | images/s | s/step | CPU s/step |", "| --- | --- | --- | --- |"]
        for name, m in s["models"].items():
            lines.append(f"| {LABELS.get(name, 'reference prototype (kpp_ref, atkey)')} | {m['images_per_s']:.0f} | "
                         f"{m['s_per_step']:.3f} | {m['cpu_s_per_step']:.3f} |")
        for k, v in s["ratios"].items():
            lines.append(f"\n{k.replace('_', ' ')}: **{v:.2f}**")
        lines.append("")
    p = report.get("profile_breakdown")
    if p:
        lines += [f"## Where a K++ step goes (torch.profiler, {p['clock'].replace('_', ' ')})", "",
                  "| part | ms/step | share of the step |", "| --- | --- | --- |"]
        for k, v in p["ms_per_step"].items():
            lines.append(f"| {k} | {v:.1f} | {v / max(p['step_ms'], 1e-9):.0%} |")
        lines.append("")
    ld = report.get("loader")
    if ld:
        lines += ["## Data supply", "",
                  f"Shard reader (local shards, 0 DataLoader workers): {ld['images_per_s']:,} images/s; K++ training "
                  f"consumes {ld['training_images_per_s']:.0f} images/s: supply/consumption = "
                  f"**{ld['supply_over_consumption']:.0f}x**.", ""]
    rv = report.get("ray_vs_torchrun")
    if rv:
        lines += ["## Ray Train vs plain torchrun (identical DDP work, gloo, 1 thread per worker)", "",
                  f"research.benchmark_train's model, {rv['steps']} steps of 8 episodes x 8 images per worker.", "",
                  "| workers | loop time Ray/torchrun | episodes/s per worker (Ray) | episodes/s per worker (torchrun) | "
                  "peak RSS per worker MB (Ray) | launch to first step s (Ray / torchrun) | "
                  "start-up + tear-down s (Ray / torchrun) | same final loss |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for w, r in rv["by_workers"].items():
            s_ = r["summary_best_of_repeats"]
            lines.append(f"| {w} | {r['loop_time_ratio_ray_over_torchrun']:.2f} | "
                         f"{s_['ray_train']['episodes_per_s_per_worker']:.1f} | "
                         f"{s_['torchrun']['episodes_per_s_per_worker']:.1f} | {s_['ray_train']['peak_rss_mb_rank0']:.0f} | "
                         f"{r['launch_to_first_step_s']['ray_train']:.1f} / {r['launch_to_first_step_s']['torchrun']:.1f} | "
                         f"{r['fixed_overhead_s']['ray_train']:.1f} / {r['fixed_overhead_s']['torchrun']:.1f} | "
                         f"{r['same_final_loss']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help=f"one of {', '.join(PROFILES)}, loop")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--datasets", default=None, help=f"comma-separated, of {', '.join(DATASETS)} (default: the profile's)")
    ap.add_argument("--workers", default=None, help="worker counts of the Ray-vs-torchrun section, e.g. 1,2 (0: skip)")
    ap.add_argument("--sections", default="quality,speed,profile,loader,ray", help="which parts to run")
    ap.add_argument("--out", default="outputs/benchmarks", help="directory for <profile>.json and <profile>.md")
    args = ap.parse_args(argv)
    if args.profile == "loop":  # its own job: services, Ray Train and a bare loop side by side
        from research import benchmark_loop
        return benchmark_loop.main(["--out", args.out])
    if args.profile not in PROFILES:
        raise BenchmarkError(f"unknown profile {args.profile!r}: choose from {', '.join(PROFILES)}")
    prof = dataclasses.replace(PROFILES[args.profile])
    if args.workers is not None:
        try:
            prof.ray_workers = tuple(int(w) for w in args.workers.split(",") if int(w) > 0)
        except ValueError:
            raise BenchmarkError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
    models = [m for m in args.models.split(",") if m]
    datasets = args.datasets.split(",") if args.datasets else list(prof.steps)
    sections = set(args.sections.split(","))
    unknown = sections - {"quality", "speed", "profile", "loader", "ray"}
    if unknown:
        raise BenchmarkError(f"unknown section {', '.join(sorted(unknown))}")
    check(prof, args.profile, models, datasets)

    started = time.perf_counter()
    torch.set_num_threads(prof.threads)
    device_name = (torch.cuda.get_device_name(0) if prof.device.startswith("cuda")
                   else f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})")
    report: dict[str, Any] = {
        "profile": args.profile, "command": "python -m jobs.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
        "profile_config": dataclasses.asdict(prof), "models": models,
        "machine": {"description": f"{device_name}, torch {torch.__version__}, {prof.threads} threads",
                    "cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": os.getloadavg()},
        "quality": {},
    }
    data = {d: load(d, prof, model_config(models[0], 1, (1, 28, 28), prof).episode_length) for d in datasets}
    report["episode_length"] = model_config(models[0], 1, (1, 28, 28), prof).episode_length
    if "quality" in sections:
        for dataset in datasets:
            report["quality"][dataset] = {name: quality(name, dataset, data[dataset], prof) for name in models}
    bm = data.get("binarized_mnist") or next(iter(data.values()))
    if "speed" in sections:
        report["speed"] = speed(bm, prof, models)
    if "profile" in sections:
        report["profile_breakdown"] = profile_step(bm, prof, "kpp" if "kpp" in models else models[0])
    if "loader" in sections and prof.loader:
        with tempfile.TemporaryDirectory() as tmp:
            report["loader"] = loader_supply(prof, report["episode_length"], tmp)
        consumed = (report.get("speed", {}).get("models", {}).get("kpp", {}).get("images_per_s")
                    or next(iter(report["quality"].get("binarized_mnist", {}).values()), {}).get("equal_steps", {}).get("images_per_s", math.nan))
        report["loader"]["training_images_per_s"] = consumed
        report["loader"]["supply_over_consumption"] = report["loader"]["images_per_s"] / consumed
    if "ray" in sections and prof.ray_workers:
        report["ray_vs_torchrun"] = ray_vs_torchrun(prof)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["elapsed_min"] = (time.perf_counter() - started) / 60
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.profile}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{args.profile}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / (args.profile + '.json')} and {out / (args.profile + '.md')}")
    return report


if __name__ == "__main__":
    main()
