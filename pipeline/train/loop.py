"""The training loop every rank runs: data stream, model, optimiser, steps, validation, checkpoints, metrics.

The loop (`Loop`) talks to its surroundings only through a `Session` (rank, world size, the checkpoint to resume
from, report): `LocalSession` here (one process, or torchrun), `pipeline.cluster.session.RaySession` under Ray
Train, whose `train_worker` is what each Ray worker runs. Nothing in this module imports Ray.

Resume is exact: the lr is a function of the step, the batch order a function of (seed, epoch, layout), and
the sampling noise of step s on rank r is drawn after seeding from (seed, r, s); the checkpoint holds model,
optimiser, scheduler, RNG state, step and the data cursor (pipeline.data.shards.plan.Cursor: epoch, batches, the plan
fingerprint and the layout). A job of N steps and a job halted at N/2 and re-run to N therefore give the same
weights; re-run with another worker count or batch size, it goes on with the images the epoch still owes.

Validation, checkpoints and sample grids each run on their own step schedule (`Every`), and at the last step.
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from kpp.evaluate import evaluate
from kpp.model import KanervaPlusPlus
from kpp.objective import keys_at_floor, kl_beta
from pipeline.train import checkpointing
from pipeline.train import optim
from pipeline.train.config import JobConfig
from pipeline.registry.run_logger import RankZeroLogger
from pipeline.data.shards.plan import Cursor
from pipeline.data.train_data import load_data
from pipeline.train.step import train_step



class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient (train.nonfinite=stop, or too many skips in a row)."""


class Session(Protocol):
    rank: int
    world_size: int
    # Reports of metrics alone (no checkpoint) closer together than this are skipped: each is a barrier and may
    # wait for the controller (see RaySession). MLflow still gets every log_every step from rank 0.
    min_report_interval_s: float

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, Any], folder: str | None, name: str | None) -> None: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass(frozen=True)
class Every:
    """A step schedule: due every `steps` steps (0: never) and at the job's last step."""
    steps: int

    def due(self, step: int, last: bool) -> bool:
        return last or (self.steps > 0 and step % self.steps == 0)


class Loop:
    def __init__(self, job: JobConfig, session: Session, tracking_uri: str = "", run_id: str = "", data=None,
                 started_unix: float | None = None):
        """data: (train stream, valid episodes, test episodes), built from job.data when None. started_unix: when
        the job was submitted or its driver started (pipeline.job_env.job_start); the seconds from then to the end
        of this process's first step are logged as perf/start_to_first_step_s."""
        self.job, self.s = job, session
        self.rank0 = session.rank == 0
        self.mcfg = job.model
        if data is None:
            data = load_data(job.data.dataset, job.data.source, self.mcfg.episode_length, job.data.batch_episodes,
                             job.data.valid_episodes, job.data.test_episodes, job.seed, session.rank,
                             session.world_size, shards=job.data.shards, loader_workers=job.data.loader_workers,
                             episodes=job.data.episodes)[:3]
        self.stream, self.valid, self.test = data
        torch.manual_seed(job.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.net = KanervaPlusPlus(self.mcfg)
        self.model = session.prepare_model(self.net)
        self.opt, self.sched = optim.build(self.model.parameters(), job.train)
        self.log = RankZeroLogger(tracking_uri, run_id, self.rank0 and job.tracking.enabled)
        self.step = 0
        self.data: Cursor = self.stream.start(0)
        self.validation = Every(job.eval.every_steps)
        self.checkpoints = Every(job.checkpoint.every_steps)
        self.grids = Every(job.tracking.images_every_steps)
        self.best_valid = math.inf
        self.last_valid = math.inf
        self.skipped = 0  # non-finite steps skipped, over the whole job
        self.key_kl_max: list[float] = []  # each key's largest logged KL_y: a key that never left the floor is idle
        self.device = next(self.net.parameters()).device
        self._last_report_t = time.perf_counter()  # rank 0's clock; shared with all ranks through _metrics
        self._report_due = False
        self._restored_report: dict[str, Any] = {}
        self._started_unix = started_unix
        self._start_to_first_step_s: float | None = None

    # -- the whole job ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        resumed_from = self._restore()
        self._resumed_from = -1 if resumed_from is None else resumed_from
        stop = self.job.train.halt_at_step or self.job.train.max_steps
        if resumed_from is None and self.rank0:
            self.last_valid = self._validate()  # step-0 baseline: the bound the run must lower
        if resumed_from is not None:
            if self.rank0:
                print(f"[train] resumed from the checkpoint of step {resumed_from} (epoch {self.data.epoch}, "
                      f"{self.data.batches_seen} batches in)", flush=True)
            self.log.log_metrics({"resume/from_step": resumed_from}, step=resumed_from)
            if self.step >= stop:
                return self._report_again(resumed_from)
        window = _Window(time.perf_counter(), self.step)
        self._loop_t0 = window.t  # wall time of the step loop of this process: benchmarks compare it
        # CPU time of this (the training) thread in the loop: with wall time, the share of the loop this rank was
        # actually running rather than waiting for a core, a peer's all-reduce or the host.
        self._loop_cpu_t0 = time.thread_time()
        last: dict[str, Any] = {}
        while self.step < stop:
            epoch = self.data.epoch
            for batch in self.stream.batches(self.data):
                terms, grad_norm, ok = self._step(batch.keys, batch.images)
                self._loop_s = time.perf_counter() - self._loop_t0  # excludes the eval/checkpoint after it
                self._loop_cpu_s = time.thread_time() - self._loop_cpu_t0
                self.step += 1
                if self._started_unix is not None and self._start_to_first_step_s is None:
                    self._first_step_done()
                self.data = self.stream.start(epoch + 1) if batch.last else batch.after
                done = self.step >= stop
                last = self._after_step(terms, grad_norm, window, done) or last
                if done:
                    break
            if self.data.epoch == epoch and self.step < stop:
                # a resume under another layout can leave too little of an epoch for one batch: go on to the next
                self.data = self.stream.start(epoch + 1)
        self.log.flush()  # metrics kept through a tracking-server outage reach the store before the job ends
        return last

    @property
    def start_to_first_step_s(self) -> float | None:
        """Seconds from the job's start (started_unix) to the end of this process's first step; None before it
        or when no start was given."""
        return self._start_to_first_step_s

    def _first_step_done(self) -> None:
        """Submit (or driver start) to the end of the first step: cluster start-up, resource waits, the worker
        group, data and model set-up and one step, as a user waits for them. Measured once per worker group, so a
        restarted group's figure includes the failure and the restart."""
        self._start_to_first_step_s = time.time() - self._started_unix
        self.log.log_metrics({"perf/start_to_first_step_s": self._start_to_first_step_s}, step=self.step)
        if self.rank0:
            print(f"[train] first step done {self._start_to_first_step_s:.1f} s after the job started", flush=True)

    def _report_again(self, resumed_from: int) -> dict[str, Any]:
        """Restored from the checkpoint of the last step: that step is trained, evaluated and saved, but the job ended
        (was killed) before its report reached the driver. Report it again, so that the run's last result is its
        last step's (with the test bounds) and not an older one. Every rank reports: a report is a barrier."""
        metrics = dict(self._restored_report)
        if not metrics:  # a checkpoint from before reports were kept in it: evaluate again
            metrics = {"step": self.step, "max_steps": self.job.train.max_steps, "valid_neg_elbo": self.last_valid}
            if self.step == self.job.train.max_steps:
                metrics.update(self._final())
        metrics["resumed_from_step"] = resumed_from
        self._report(metrics, save=False)
        self.log.flush()
        return metrics

    def _after_step(self, terms, grad_norm, window: "_Window", done: bool) -> dict[str, Any] | None:
        """Whatever is due at this step: validation, the sample grid, metrics, the checkpoint (in that order)."""
        save = self.checkpoints.due(self.step, done)
        # a checkpoint kept by its validation bound must carry a fresh one
        if self.validation.due(self.step, done) or (save and self.job.checkpoint.keep_by == "valid"):
            if self.rank0:
                self.last_valid = self._validate()
                self.best_valid = min(self.best_valid, self.last_valid)
        if self.grids.due(self.step, False) and not (done and self.step == self.job.train.max_steps):
            self._log_grid()  # (the last step's figures come with the final bounds)
        if not (save or self.step % self.job.train.log_every == 0):
            return None
        metrics = self._metrics(terms, grad_norm, window)
        if done and self.step == self.job.train.max_steps:
            metrics.update(self._final())
        if save or self._report_due:  # the same decision on every rank (see _metrics)
            self._report(metrics, save)
            self._last_report_t = time.perf_counter()
        return metrics

    # -- one optimiser step -----------------------------------------------------------------------------------
    def _step(self, keys: np.ndarray, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
        t = self.job.train
        # the noise of this step depends only on (seed, rank, step): identical after any resume
        r = train_step(self.model, self.opt, self.sched, x.to(self.device, non_blocking=True),
                       beta=kl_beta(self.step, self.mcfg.objective), grad_clip=t.grad_clip, precision=t.precision,
                       noise_seed=hash_seed(self.job.seed, self.s.rank, self.step))
        if r.ok:
            self._run_of_skips = 0
        else:
            self.skipped += 1
            self._run_of_skips = getattr(self, "_run_of_skips", 0) + 1
            if t.nonfinite == "stop" or self._run_of_skips > t.max_nonfinite:
                raise NonFiniteLoss(f"step {self.step + 1}: non-finite loss {r.terms['loss'].item()} / grad norm "
                                    f"{r.grad_norm.item()} ({self._run_of_skips} in a row); epoch {self.data.epoch}, "
                                    f"batch image keys {keys.tolist()}")
        return r.terms, r.grad_norm, r.ok

    # -- metrics, evaluation, checkpoints ---------------------------------------------------------------------
    def _metrics(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, window: "_Window") -> dict:
        # the last entry is rank 0's seconds since its last report (0 elsewhere): after the sum every rank holds it,
        # so all ranks agree on whether to report (a report is a barrier: one rank skipping it would hang the rest)
        since = time.perf_counter() - self._last_report_t if self.rank0 else 0.0
        names = list(terms)  # the same order on every rank
        # the clock reading joins the terms on their device (a CPU scalar beside CUDA ones fails torch.stack)
        vec = torch.stack([terms[k] for k in names] + [terms[names[0]].new_tensor(since)]).to(self.device)
        if self.s.world_size > 1:  # collective: every rank calls _metrics at the same steps
            dist.all_reduce(vec)
            vec[:-1] /= self.s.world_size
        self._report_due = vec[-1].item() >= self.s.min_report_interval_s
        vec = vec[:-1]
        now = time.perf_counter()
        steps = self.step - window.step
        episodes_per_s = steps * self.job.data.batch_episodes * self.s.world_size / max(now - window.t, 1e-9)
        window.t, window.step = now, self.step
        m = {f"train/{k}": v for k, v in zip(names, vec.tolist())}
        per_key = [m[f"train/kl_y_key{k}"] for k in range(self.mcfg.key_terms)]
        restart = self.step - self.job.train.log_every < self.mcfg.objective.kl_warmup_steps <= self.step
        if not self.key_kl_max or restart:  # idle keys are judged from the end of the KL warm-up on
            self.key_kl_max = per_key
        self.key_kl_max = [max(a, b) for a, b in zip(self.key_kl_max, per_key)]
        m.update({"train/lr": self.sched.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
                  "train/beta": kl_beta(self.step, self.mcfg.objective),
                  "train/nonfinite_skipped": self.skipped, "perf/episodes_per_s": episodes_per_s,
                  "perf/images_per_s": episodes_per_s * self.mcfg.episode_length, "epoch": self.data.epoch,
                  "perf/loop_s": self._loop_s, "perf/loop_cpu_s": self._loop_cpu_s, "perf/peak_rss_mb": peak_rss_mb()})
        self.log.log_metrics(m, step=self.step)
        if self._started_unix is not None:  # reported with every report; logged to MLflow once, above
            m["perf/start_to_first_step_s"] = self._start_to_first_step_s
        m.update({"step": self.step, "max_steps": self.job.train.max_steps,
                  "resumed_from_step": self._resumed_from,  # -1: this worker group started fresh
                  "valid_neg_elbo": self.last_valid})
        return m

    def _validate(self) -> float:
        r = evaluate(self.net, self.valid, iwae_samples=1, seed=self.job.eval.seed, leave_one_out=False)
        self.log.log_metrics({"valid/neg_elbo": r["neg_elbo"], "valid/swap_gap": r["swap_gap"],
                              "valid/kl_y": r["kl_y"], "valid/kl_z": r["kl_z"]}, step=self.step)
        return r["neg_elbo"]

    def _final(self) -> dict[str, float]:
        """Test bounds on rank 0 (the others wait at the next report)."""
        if not self.rank0:
            return {}
        r = evaluate(self.net, self.test, iwae_samples=self.job.eval.iwae_samples, seed=self.job.eval.seed)
        out = {f"test/{k}": float(v) for k, v in r.items() if isinstance(v, (int, float))}
        idle = keys_at_floor(self.key_kl_max, self.mcfg.objective.key_free_bits)
        out["train/keys_at_floor"] = float(len(idle))
        self.log.log_metrics(out, step=self.step)
        self.log.set_tags({"train.keys_at_floor": ",".join(map(str, idle)) or "none"})
        out["keys_at_floor"] = idle
        self.log.set_tags({"test.unit": r["unit"]})
        self._log_grid(final=True)
        self.log.log_curves(["train/loss", "train/recon", "train/kl_z", "train/kl_y", "valid/neg_elbo",
                             "valid/swap_gap", "train/lr"])
        return out

    def _log_grid(self, final: bool = False) -> None:
        """The labelled sample grid (samples/<step or final>.png) and, as image series over steps (log_image), the
        same grid and the memory/keys figure of the first test episode."""
        if not self.log.active:
            return
        from kpp import viz
        episode = self.test[:1]
        fig = viz.labelled_sample_figure(self.net, episode, seed=self.job.eval.seed, step=self.step)
        with tempfile.TemporaryDirectory() as d:
            name = "final.png" if final else f"step_{self.step:09d}.png"
            viz.save_figure(fig, pathlib.Path(d) / name)
            self.log.log_artifact(pathlib.Path(d) / name, "samples")
        self.log.log_image(viz.figure_array(fig), "samples", self.step)
        try:
            memory = viz.memory_keys_figure(self.net, episode, seed=self.job.eval.seed,
                                            title=f"Memory and keys of test episode 0 at step {self.step}")
        except ValueError as e:  # a memory that is no 2-D map has no such figure; training goes on
            print(f"[train] no memory/keys figure: {e}", flush=True)
            return
        self.log.log_image(viz.figure_array(memory), "memory_keys", self.step)

    def _report(self, metrics: dict[str, Any], save: bool) -> None:
        if not save:
            self.s.report(metrics, None, None)
            return
        with tempfile.TemporaryDirectory() as d:
            folder = None
            if self.rank0:  # DDP replicas are identical: one copy of the state is enough
                checkpointing.save(d, model=self.net, optimizer=self.opt, scheduler=self.sched,
                                   step=self.step, cursor=self.data.to_dict(),
                                   extra={"best_valid": self.best_valid, "last_valid": self.last_valid,
                                          "skipped": self.skipped, "key_kl_max": self.key_kl_max,
                                          "report": metrics})
                folder = d
            self.s.report(metrics, folder, checkpointing.folder_name(self.step))

    def _restore(self) -> int | None:
        with self.s.restore_dir() as d:
            if d is None:
                return None
            payload = checkpointing.load(d, map_location=self.device)
        checkpointing.restore(payload, model=self.net, optimizer=self.opt, scheduler=self.sched)
        c = payload["cursor"]
        self.step = payload["step"]
        # checkpoints before kpp-train/2 kept {epoch, batch} only: taken as is, in the layout of this run
        self.data = Cursor.from_dict(c) if "batches_seen" in c else Cursor(c["epoch"], c["batch"])
        e = payload["extra"]
        self.best_valid, self.last_valid, self.skipped = e["best_valid"], e["last_valid"], e["skipped"]
        self.key_kl_max = list(e.get("key_kl_max", []))
        self._restored_report = dict(e.get("report", {}))  # what the step of this checkpoint reported
        return self.step


@dataclass
class _Window:
    t: float
    step: int


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (never Python's salted hash())."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


# -- without Ray (one process, or torchrun) --------------------------------------------------------------------
class LocalSession:
    """Checkpoints as folders under `root` (the newest complete one is resumed); DDP when a process group is up."""

    min_report_interval_s = 0.0  # reports cost nothing here: keep every one

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def restore_dir(self):
        found = checkpointing.latest_complete(self.root)
        yield str(found) if found else None

    def report(self, metrics, folder, name):
        if folder and name:
            import shutil
            shutil.copytree(folder, self.root / name, dirs_exist_ok=True)
        self.reports.append(dict(metrics))
        if dist.is_initialized():
            dist.barrier()  # the same synchronisation point as ray.train.report

    def prepare_model(self, model):
        """On the process's GPU where there is one (torchrun's LOCAL_RANK), else the CPU; DDP in a process group."""
        device_ids = None
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            model = model.to(f"cuda:{local_rank}")
            device_ids = [local_rank]
        if dist.is_initialized():
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model
