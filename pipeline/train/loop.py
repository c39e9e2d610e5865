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
Validation reports two bounds: valid_chain_neg_elbo (each image under a memory of the images before it, a proper
bound on -ln p(X)/T), which selects (the best checkpoint, ASHA, the search), and valid_neg_elbo, the
memory-conditional bound (the image in its own memory: the paper's), which a memory that copies each image to its
own prior lowers while predicting nothing. The final test logs all three bounds and the chain curve (a table and a
figure: the bound against the number of images already in memory).

The loop is a short list of components: the data stream (batches with their cursor, copied to the device a step
ahead), `train_step` (no host sync), `StepMetrics` (device-side counters, one all-reduce and one host read per
`log_every` steps, the report clock, idle keys), `Checkpointer` (its schedule and keep rule, the restore, reports and
checkpoint writes on a background thread; the training thread only copies the state) and rank 0's MLflow logger (a sender thread). So between log steps the CPU never waits for the
GPU, and a checkpoint upload or a slow tracking server never holds up a step (docs/speed.md has the figures).
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import pathlib
import tempfile
import time
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from kpp.evaluate import evaluate
from kpp.model import KanervaPlusPlus
from kpp.objective import kl_beta
from pipeline.data.shards.plan import Cursor
from pipeline.data.train_data import load_data
from pipeline.registry.run_logger import RankZeroLogger, TrackingError
from pipeline.train import affinity, checkpointing
from pipeline.train import optim
from pipeline.train.checkpointer import Checkpointer, Every
from pipeline.train.config import JobConfig
from pipeline.train.gc_schedule import GcSchedule
from pipeline.train.key_audit import KeyAudit
from pipeline.train.metrics import StepMetrics
from pipeline.train.step import train_step


SPREAD_EVERY_S = 1.0  # at log steps, threads that inherited the training core are moved off it at most this often
# The validation bounds every report carries (inf until the first validation, and on the ranks that do not
# validate): the chain bound, which selects (checkpoint.keep_by=valid, sweeps), and the memory-conditional one.
SELECTS = "valid_chain_neg_elbo"
UNVALIDATED = {SELECTS: math.inf, "valid_neg_elbo": math.inf}


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient (train.nonfinite=stop, or too many skips in a row)."""


class Session(Protocol):
    rank: int
    world_size: int
    # Reports of metrics alone (no checkpoint) closer together than this are skipped: each is a barrier and may
    # wait for the controller (see RaySession). MLflow still gets every log_every step from rank 0.
    min_report_interval_s: float

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        """Called from the Checkpointer's background thread, one report at a time, in order; it must make no
        torch.distributed collective (the training thread's all-reduces run meanwhile)."""
        ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


class Loop:
    def __init__(self, job: JobConfig, session: Session, tracking_uri: str = "", run_id: str = "", data=None,
                 started_unix: float | None = None):
        """data: (train stream, valid episodes, test episodes), built from job.data when None. started_unix: when
        the job was submitted or its driver started (pipeline.job_env.job_start); the seconds from then to the end
        of this process's first step are logged as perf/start_to_first_step_s."""
        self.job, self.session = job, session
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
        self.device = next(self.net.parameters()).device
        self.opt, self.sched = optim.build(self.model.parameters(), job.train)
        self.tracker = RankZeroLogger(tracking_uri, run_id, self.rank0 and job.tracking.enabled)
        # the metrics of the steps a checkpoint covers reach the store before the checkpoint is reported: a worker
        # group restarted from it replays only the steps after it
        # a checkpoint waits for the metrics before it to be stored, but never near the collective timeout: the
        # other ranks wait for this one at their next collective (a tracking outage must not fail the group)
        delivery_s = min(60.0, job.scaling.timeout_s / 4)
        self.checkpointer = Checkpointer(session, job.checkpoint.every_steps, keep_by=job.checkpoint.keep_by,
                                         before_checkpoint=lambda: self.tracker.delivered(delivery_s))
        self.metrics = StepMetrics(rank=session.rank, world_size=session.world_size, device=self.device,
                                   key_terms=self.mcfg.key_terms, warmup_steps=self.mcfg.objective.kl_warmup_steps,
                                   min_report_interval_s=session.min_report_interval_s)
        self.validation = Every(job.eval.every_steps)
        self.grids = Every(job.tracking.images_every_steps)
        self.step = 0
        self.cursor: Cursor = self.stream.start(0)
        self.best_valid = math.inf  # the lowest validation chain bound so far
        self.last_valid = dict(UNVALIDATED)  # the last validation's bounds, as reported
        self.resumed_from = -1  # -1: this worker group started fresh
        self.loop_s = 0.0  # wall time of this process's step loop so far (benchmarks compare it)
        # CPU time of this (the training) thread in the loop: with wall time, the share of the loop this rank was
        # actually running rather than waiting for a core, a peer's all-reduce or the host.
        self.loop_cpu_s = 0.0
        self.first_batch_wait_s = 0.0  # the wait for the data loader's first batch (its workers' start-up)
        self.checkpoints_skipped = 0  # checkpoint.when_behind=skip
        self._recent_keys: collections.deque = collections.deque(maxlen=job.train.log_every)  # (step, keys)
        self.audit = KeyAudit(job.data.audit_dir, session.rank) if job.data.audit_dir else None
        self._restored_report: dict[str, Any] = {}
        self._started_unix = started_unix
        self._start_to_first_step_s: float | None = None
        self.pin: affinity.CorePin | None = None  # scaling.pin_training_thread, set by run()
        self.collector = GcSchedule(0)  # train.gc_every: the step loop's own, set around it by _run()

    @property
    def skipped(self) -> int:
        return self.metrics.skipped

    # -- the whole job ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.job.scaling.pin_training_thread:
            reserved = affinity.parse_cpu_list(self.job.scaling.training_cores) if self.job.scaling.training_cores \
                else frozenset()
            self.pin = affinity.pin_training_thread(reserved)
            if self.pin is not None and self.rank0:
                print(f"[train] training thread pinned to core {self.pin.core}; the rest of the worker on "
                      f"{sorted(self.pin.others)}", flush=True)
        try:
            return self._run()
        finally:
            if self.pin is not None:
                self.pin.release()
            close = getattr(self.stream, "close", None)
            if close is not None:
                close()  # the stream's DataLoader workers
            self.checkpointer.close()
            if self.audit is not None:
                self.audit.close()

    def _run(self) -> dict[str, Any]:
        resumed_from = self._restore()
        self.resumed_from = -1 if resumed_from is None else resumed_from
        stop = self.job.train.halt_at_step or self.job.train.max_steps
        warm = getattr(self.stream, "warm", None)
        if warm is not None and self.step < stop:
            warm(self.cursor)  # the data loader's workers start while rank 0 validates
            if self.pin is not None:
                self.pin.spread()  # ... and do their start-up (imports: 1-2 s of CPU) off the training core
        if resumed_from is None and self.rank0:
            self.last_valid = self._validate()  # step-0 baseline: the bounds the run must lower
        if resumed_from is not None:
            if self.rank0:
                print(f"[train] resumed from the checkpoint of step {resumed_from} (epoch {self.cursor.epoch}, "
                      f"{self.cursor.batches_seen} batches in)", flush=True)
            self.tracker.log_metrics({"resume/from_step": resumed_from}, step=resumed_from)
            if self.step >= stop:
                return self._report_again(resumed_from)
        ready = getattr(self.stream, "ready", None)
        if ready is not None and self.step < stop:
            # the loader's start-up is the job's, once (perf/first_batch_wait_s), not a cost of every step: the
            # loop's clock and the data wait begin with the first batch in hand
            t = time.perf_counter()
            ready()
            self.first_batch_wait_s = time.perf_counter() - t
            self.tracker.log_metrics({"perf/first_batch_wait_s": self.first_batch_wait_s}, step=self.step)
        if self.pin is not None:
            self.pin.spread()  # the loader's workers, started from this thread, inherited its core
        self.metrics.start(self.step)
        with GcSchedule(self.job.train.gc_every) as self.collector:
            last = self._steps(stop)
        self.checkpointer.drain()  # the last report and checkpoint are stored before the job returns
        self.tracker.flush()  # metrics kept through a tracking-server outage reach the store before the job ends
        return last

    def _steps(self, stop: int) -> dict[str, Any]:
        """The step loop, from the first batch in hand to `stop`; the last metrics collected."""
        loop_t0, loop_cpu_t0 = time.perf_counter(), time.thread_time()
        last: dict[str, Any] = {}
        while self.step < stop:
            epoch = self.cursor.epoch
            batches = self._on_device(self.stream.batches(self.cursor))
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                self.metrics.window.data_wait_s += time.perf_counter() - t
                if batch is None:
                    break
                keys, x, after, epoch_end = batch
                terms, grad_norm = self._step(keys, x)
                self.loop_s = time.perf_counter() - loop_t0  # excludes the eval/checkpoint after it
                self.loop_cpu_s = time.thread_time() - loop_cpu_t0
                if self._started_unix is not None and self._start_to_first_step_s is None:
                    self._first_step_done()
                self.cursor = self.stream.start(epoch + 1) if epoch_end else after
                done = self.step >= stop
                last = self._after_step(terms, grad_norm, done) or last
                self.collector.step(self.step)
                if done:
                    break
            if self.cursor.epoch == epoch and self.step < stop:
                # a resume under another layout can leave too little of an epoch for one batch: go on to the next
                self.cursor = self.stream.start(epoch + 1)
        return last

    def _on_device(self, batches) -> Iterator[tuple[np.ndarray, torch.Tensor, Cursor, bool]]:
        """(keys, images on the training device, cursor after, last of the epoch). On a GPU the next batch is
        fetched and its copy from pinned memory issued before the current one is handed out, so the copy overlaps
        the running step; on the CPU there is nothing to overlap and batches pass straight through."""
        if self.device.type != "cuda":
            for b in batches:
                yield b.keys, b.images, b.after, b.last
            return
        ahead = None
        for b in batches:
            current = ahead
            ahead = (b.keys, b.images.pin_memory().to(self.device, non_blocking=True), b.after, b.last)
            if current is not None:
                yield current
        if ahead is not None:
            yield ahead

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
        self.tracker.log_metrics({"perf/start_to_first_step_s": self._start_to_first_step_s}, step=self.step)
        if self.rank0:
            print(f"[train] first step done {self._start_to_first_step_s:.1f} s after the job started", flush=True)

    def _report_again(self, resumed_from: int) -> dict[str, Any]:
        """Restored from the checkpoint of the last step: that step is trained, evaluated and saved, but the job ended
        (was killed) before its report reached the driver. Report it again, so that the run's last result is its
        last step's (with the test bounds) and not an older one. Every rank reports: a report is a barrier."""
        metrics = dict(self._restored_report)
        if not metrics:  # a checkpoint from before reports were kept in it: evaluate again
            metrics = {"step": self.step, "max_steps": self.job.train.max_steps, **self.last_valid}
            if self.step == self.job.train.max_steps:
                metrics.update(self._final())
        metrics["resumed_from_step"] = resumed_from
        self.checkpointer.report(metrics)
        self.checkpointer.drain()
        self.tracker.flush()
        return metrics

    def _after_step(self, terms, grad_norm, done: bool) -> dict[str, Any] | None:
        """Whatever is due at this step: validation, the sample grid, metrics, the checkpoint (in that order)."""
        save = self.checkpointer.due(self.step, done)
        if self.validation.due(self.step, done) or self.checkpointer.needs_fresh_valid(self.step, done):
            if self.rank0:
                self.last_valid = self._validate()
                self.best_valid = min(self.best_valid, self.last_valid[SELECTS])
            self.collector.full()  # a pause already (rank 0 validates, the others wait at the next collective)
        if self.grids.due(self.step, False) and not (done and self.step == self.job.train.max_steps):
            try:
                self._log_grid()  # (the last step's figures come with the final bounds)
            except TrackingError as e:  # a picture mid-run is not worth the job: the server is down, train on
                print(f"[train] step {self.step}: sample grid not logged ({e})", flush=True)
        if not (save or self.step % self.job.train.log_every == 0):
            return None
        metrics, report_due, in_flight_most = self._collect(terms, grad_norm)
        if save and not done and self.job.checkpoint.when_behind == "skip" \
                and in_flight_most >= self.checkpointer.max_in_flight:
            self._skip_checkpoint(in_flight_most)  # the same decision on every rank (all-reduced count)
            save = False
        if done and self.step == self.job.train.max_steps:
            metrics.update(self._final())
        if save:
            timing = self.checkpointer.save(self.step, metrics,
                                            (lambda: self._snapshot(metrics)) if self.rank0 else None)
            self.tracker.log_metrics({"perf/checkpoint_stall_s": timing.stall_s,
                                      "perf/state_copy_s": timing.state_copy_s,
                                      "perf/checkpoint_room_wait_s": timing.room_wait_s}, step=self.step)
            if timing.warning and self.rank0 and not done:  # (the last one waits for the others by design)
                print(f"[train] WARNING {timing.warning}", flush=True)
        elif report_due:  # the same decision on every rank (StepMetrics.collect)
            self.checkpointer.report(metrics)
        if save or report_due:
            self.metrics.reported()
        if self.pin is not None:
            # threads and loader workers started since inherited the training core; a walk costs ~0.5 ms
            self.pin.spread(min_interval_s=SPREAD_EVERY_S)
        return metrics

    def _skip_checkpoint(self, in_flight: int) -> None:
        """checkpoint.when_behind=skip: the checkpoint due now would wait for earlier reports; train on instead
        (the next one is due `checkpoint.every_steps` later; a resume then repeats at most twice as many steps)."""
        self.checkpoints_skipped += 1
        self.tracker.log_metrics({"perf/checkpoints_skipped": self.checkpoints_skipped}, step=self.step)
        if self.rank0 and self.checkpoints_skipped == 1:
            print(f"[train] WARNING step {self.step}: checkpoint skipped, {in_flight} earlier reports still in "
                  f"flight: the store or Ray's controller (one report per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) takes "
                  f"them slower than checkpoint.every_steps={self.job.checkpoint.every_steps} makes them; raise it "
                  f"to keep every one (checkpoint.when_behind=wait waits for them instead)", flush=True)

    # -- one optimiser step -----------------------------------------------------------------------------------
    def _step(self, keys: np.ndarray, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        t = self.job.train
        started = time.perf_counter()
        # the noise of this step depends only on (seed, rank, step): identical after any resume
        r = train_step(self.model, self.opt, self.sched, x, beta=kl_beta(self.step, self.mcfg.objective),
                       grad_clip=t.grad_clip, precision=t.precision,
                       noise_seed=hash_seed(self.job.seed, self.session.rank, self.step))
        self.metrics.window.step_host_s += time.perf_counter() - started
        self.step += 1
        self.metrics.after_step(self.step, r.ok)  # skips are counted on the device; the policy acts at log steps
        self._recent_keys.append((self.step, keys))
        if self.audit is not None:
            self.audit.record(self.step, self.cursor.epoch, keys)  # self.cursor: where this batch came from
        return r.terms, r.grad_norm

    # -- metrics, evaluation, checkpoints ---------------------------------------------------------------------
    def _collect(self, terms: dict[str, torch.Tensor],
                 grad_norm: torch.Tensor) -> tuple[dict[str, Any], bool, int]:
        """The log step's metrics (StepMetrics: one all-reduce, one host read), logged from rank 0; the
        non-finite policy applied to the window; whether a metrics-only report is due; the most reports in
        flight on any rank."""
        window = self.metrics.collect(self.step, terms, grad_norm, self.job.data.batch_episodes,
                                      self.checkpointer.pending())
        self._enforce_nonfinite_policy(window)
        m = window["metrics"]
        m.update({"train/lr": self.sched.get_last_lr()[0], "train/beta": kl_beta(self.step, self.mcfg.objective),
                  "perf/images_per_s": m["perf/episodes_per_s"] * self.mcfg.episode_length,
                  "epoch": self.cursor.epoch, "perf/loop_s": self.loop_s, "perf/loop_cpu_s": self.loop_cpu_s,
                  "perf/peak_rss_mb": peak_rss_mb()})
        self.tracker.log_metrics(m, step=self.step)
        if self._started_unix is not None:  # reported with every report; logged to MLflow once, above
            m["perf/start_to_first_step_s"] = self._start_to_first_step_s
        m.update({"step": self.step, "max_steps": self.job.train.max_steps, "resumed_from_step": self.resumed_from,
                  **self.last_valid})
        return m, window["report_due"], window["reports_in_flight_most"]

    def _enforce_nonfinite_policy(self, window: dict[str, Any]) -> None:
        t = self.job.train
        if not window["window_skips"]:
            return
        if t.nonfinite == "stop" or window["run_max"] > t.max_nonfinite:
            bad = window["first_bad"] if t.nonfinite == "stop" else self.step
            keys = next((k for s, k in self._recent_keys if s == bad), None)
            raise NonFiniteLoss(f"step {bad}: non-finite loss or gradient, update skipped ({window['run_max']} in a "
                                f"row, {window['window_skips']} since the last log step; train.nonfinite="
                                f"{t.nonfinite}, train.max_nonfinite={t.max_nonfinite}); epoch {self.cursor.epoch}, "
                                f"batch image keys {keys.tolist() if keys is not None else 'not kept'}")

    def _snapshot(self, report: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's state in host memory (DDP replicas are identical: one copy is enough)."""
        return checkpointing.snapshot(model=self.net, optimizer=self.opt, scheduler=self.sched, step=self.step,
                                      cursor=self.cursor.to_dict(),
                                      extra={"best_valid_chain": self.best_valid, "last_valid": dict(self.last_valid),
                                             "skipped": self.skipped, "key_kl_max": self.metrics.key_kl_max,
                                             "report": report})

    def _validate(self) -> dict[str, float]:
        """The validation bounds as reported (valid_chain_neg_elbo, valid_neg_elbo), logged as valid/*."""
        r = evaluate(self.net, self.valid, iwae_samples=1, seed=self.job.eval.seed, leave_one_out=False, chain=True)
        self.tracker.log_metrics({"valid/chain_neg_elbo": r["chain_neg_elbo"], "valid/neg_elbo": r["neg_elbo"],
                                  "valid/swap_gap": r["swap_gap"], "valid/kl_y": r["kl_y"], "valid/kl_z": r["kl_z"]},
                                 step=self.step)
        return {"valid_chain_neg_elbo": r["chain_neg_elbo"], "valid_neg_elbo": r["neg_elbo"]}

    def _final(self) -> dict[str, float]:
        """Test bounds on rank 0 (the others wait at the next report)."""
        if not self.rank0:
            return {}
        r = evaluate(self.net, self.test, iwae_samples=self.job.eval.iwae_samples, seed=self.job.eval.seed)
        out = {f"test/{k}": float(v) for k, v in r.items() if isinstance(v, (int, float))}
        idle = self.metrics.idle_keys(self.mcfg.objective.key_free_bits)
        out["train/keys_at_floor"] = float(len(idle))
        self.tracker.log_metrics(out, step=self.step)
        self.tracker.set_tags({"train.keys_at_floor": ",".join(map(str, idle)) or "none"})
        out["keys_at_floor"] = idle
        self.tracker.set_tags({"test.unit": r["unit"]})
        self._log_grid(final=True)
        self._log_chain_curve(r)
        self.tracker.log_curves(["train/loss", "train/recon", "train/kl_z", "train/kl_y", "valid/chain_neg_elbo",
                                 "valid/neg_elbo", "valid/swap_gap", "train/lr"])
        return out

    def _log_chain_curve(self, r: dict[str, Any]) -> None:
        """The test chain bound against the number of images already in memory: a table (curves/chain_curve.json,
        in the run's Tables view; one set of rows per step, so an extended job adds its own) and a labelled figure
        (curves/chain_curve.png, this step's). A memory that helps makes it fall with n; n = 0 is the empty memory."""
        if not self.tracker.active:
            return
        from pipeline.registry import naming
        from pipeline.registry.curves import plot_chain_curve
        n = len(r["chain_curve"])
        self.tracker.log_table({"step": [self.step] * n, "earlier_images": list(range(n)),
                                "chain_neg_elbo": r["chain_curve"], "chain_iwae": r["chain_iwae_curve"]},
                               "curves/chain_curve.json", key="step")
        title = (f"{naming.model_label(self.job)} on {self.job.data.dataset} ({self.job.data.episodes} episodes of "
                 f"{n}), step {self.step}")
        with tempfile.TemporaryDirectory() as d:
            path = plot_chain_curve(r["chain_curve"], r["chain_iwae_curve"], r["unit"], int(r["iwae_samples"]),
                                    title, pathlib.Path(d) / "chain_curve.png")
            self.tracker.log_artifact(path, "curves")

    def _log_grid(self, final: bool = False) -> None:
        """The labelled sample grid (samples/<step or final>.png) and, as image series over steps (log_image), the
        same grid and the memory/keys figure of the first test episode."""
        if not self.tracker.active:
            return
        # mid-run pictures get one try and none while the server is known down: rank 0 must not sit in retries
        # while the other ranks wait at the next collective; the final ones are retried (the job waits for them)
        attempts = None if final else 1  # None: the end-of-job budget (run_logger.END_POLICY)
        if not final and self.tracker.server_down:
            raise TrackingError("the tracking server is down")
        from kpp import viz
        episode = self.test[:1]
        fig = viz.labelled_sample_figure(self.net, episode, seed=self.job.eval.seed, step=self.step)
        with tempfile.TemporaryDirectory() as d:
            name = "final.png" if final else f"step_{self.step:09d}.png"
            viz.save_figure(fig, pathlib.Path(d) / name)
            self.tracker.log_artifact(pathlib.Path(d) / name, "samples", attempts)
        self.tracker.log_image(viz.figure_array(fig), "samples", self.step, attempts)
        try:
            memory = viz.memory_keys_figure(self.net, episode, seed=self.job.eval.seed,
                                            title=f"Memory and keys of test episode 0 at step {self.step}")
        except ValueError as e:  # a memory that is no 2-D map has no such figure; training goes on
            print(f"[train] no memory/keys figure: {e}", flush=True)
            return
        self.tracker.log_image(viz.figure_array(memory), "memory_keys", self.step, attempts)

    def _restore(self) -> int | None:
        payload = self.checkpointer.restore(self.device)
        if payload is None:
            return None
        checkpointing.restore(payload, model=self.net, optimizer=self.opt, scheduler=self.sched)
        c = payload["cursor"]
        self.step = payload["step"]
        # checkpoints before kpp-train/2 kept {epoch, batch} only: taken as is, in the layout of this run
        self.cursor = Cursor.from_dict(c) if "batches_seen" in c else Cursor(c["epoch"], c["batch"])
        e = payload["extra"]
        last = e["last_valid"]
        # a checkpoint from before the chain bound holds the memory-conditional bound alone: the chain bound is
        # unknown (the worst, for the keep rule and ASHA) until the next validation
        self.last_valid = dict(last) if isinstance(last, dict) else {**UNVALIDATED, "valid_neg_elbo": last}
        self.best_valid = e.get("best_valid_chain", math.inf)
        self.metrics.skipped = e["skipped"]
        self.metrics.key_kl_max = list(e.get("key_kl_max", []))
        self._restored_report = dict(e.get("report", {}))  # what the step of this checkpoint reported
        return self.step


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
        # no barrier: this runs on the Checkpointer's thread, and a collective there would interleave with the
        # training thread's all-reduces; the ranks meet at the next all-reduce anyway

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
