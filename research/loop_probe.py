"""The training loop with bare steps timed inside its own worker, for research.benchmark_loop.

`BracketedLoop` (the benchmark's default): the bare loop runs right before the real step loop and right after it
(once the last report is stored), in the same worker process, thread and core, over the loop's own batches held in
memory. The full loop itself runs as it always does, so all its helper threads' work (reports, checkpoint uploads,
MLflow sends) falls in its time. Against a bare loop run in the benchmark's driver, ~20 s of Ray Train start-up
away on either side, the two sides are seconds apart in the same process (this VM's speed drifts by 10-20% over a
minute: the driver's before and after bare loops of one pair differed by up to 20%, measured in stop 37).

`ProbedLoop` (`--interleaved`) is the real `Loop`; after every PROBE_CHUNK of its steps it runs `train_step` of a second model
(same initial weights, optimiser, schedule, noise seeds) over the same PROBE_CHUNK batches, already in memory, in
the same thread on the same core, and nothing else. Both then meet the same state of the machine (its drift over
minutes, a busy other core, Ray's processes starting beside the run), which a bare loop run before or after the
full one does not: on this 2-core VM the step ran 3-15% slower with the other core busy (measured, docs/speed.md),
and the full run keeps it busier (the loader, the S3 and MLflow stand-ins, Ray's controller) than the idle cluster
beside a bare loop. The bare model sees the loop's batches in the loop's order with the loop's seeds, so it
trains the same trajectory: its last loss equals the loop's (a check that the two do the same work).

`probe_worker` is the Ray Train worker that runs it (driver.RunOptions.worker); the totals go to the job's MLflow
run as probe/* metrics for the benchmark's driver to read.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from kpp.model import KanervaPlusPlus
from kpp.objective import kl_beta
from pipeline.cluster import session
from pipeline.train import optim
from pipeline.train.loop import Loop, hash_seed
from pipeline.train.step import train_step


def bare_train(job, mcfg, batches: list[torch.Tensor], collector, rank: int = 0, device="cpu",
               first_step: int = 0) -> dict[str, Any]:
    """`train_step` over `batches` alone for a fresh model with the loop's initial weights (job.seed), optimiser,
    schedule, KL weights and noise seeds, on the calling thread, calling `collector.step` after each step as the loop
    does (its garbage collection schedule, pipeline.train.gc_schedule): the model's own speed here. Seconds from the
    start to the end of each step (`at`), thread time, last loss."""
    t = job.train
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state untouched
        torch.manual_seed(job.seed)  # as Loop seeds its model: the same initial weights
        model = KanervaPlusPlus(mcfg).to(device)
    opt, sched = optim.build(model.parameters(), t)
    at = []
    t0, cpu0 = time.perf_counter(), time.thread_time()
    for i, x in enumerate(batches):
        step = first_step + i
        r = train_step(model, opt, sched, x, beta=kl_beta(step, mcfg.objective), grad_clip=t.grad_clip,
                       precision=t.precision, noise_seed=hash_seed(job.seed, rank, step))
        at.append(time.perf_counter() - t0)
        collector.step(step + 1)
    cpu = time.thread_time() - cpu0
    return {"loop_s": at[-1], "loop_cpu_s": cpu, "at": at, "final_loss": float(r.terms["loss"])}


class BracketedLoop(Loop):
    """The real loop between two bare loops over its own batches, in its own worker (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bare_sides: list[dict[str, Any]] = []

    def _steps(self, stop: int) -> dict[str, Any]:
        if self.step != 0 or self.session.world_size != 1:
            raise ValueError("BracketedLoop measures a fresh one-worker run (the benchmark's)")
        from research.benchmark_loop import read_batches  # the loop's batches, as its stream yields them
        batches = read_batches(self.job, stop)
        self.bare_sides.append(self._bare(batches))
        last = super()._steps(stop)
        # the last report and MLflow sends stored first, as after the real loop's clock: not in the bare side's time
        self.checkpointer.drain()
        self.tracker.flush()
        self.bare_sides.append(self._bare(batches))
        return last

    def _bare(self, batches: list[torch.Tensor]) -> dict[str, Any]:
        return bare_train(self.job, self.mcfg, batches, self.collector, self.session.rank, self.device)

    def run(self) -> dict[str, Any]:
        result = super().run()
        if len(self.bare_sides) == 2:
            before, after = self.bare_sides
            every = self.job.train.log_every
            # the bare loops' clock at each log step, averaged over the two sides (the benchmark's window ratios)
            for k in range(every, len(before["at"]) + 1, every):
                self.tracker.log_metrics({"probe/bare_at_s": (before["at"][k - 1] + after["at"][k - 1]) / 2}, step=k)
            self.tracker.log_metrics({"probe/bare_before_s": before["loop_s"], "probe/bare_after_s": after["loop_s"],
                                      "probe/bare_before_cpu_s": before["loop_cpu_s"],
                                      "probe/bare_after_cpu_s": after["loop_cpu_s"],
                                      "probe/bare_final_loss": before["final_loss"],
                                      "probe/bare_after_final_loss": after["final_loss"]}, step=0)
            self.tracker.flush()
        return result


def bracketed_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker of the default measure (driver.RunOptions.worker)."""
    session.train_worker(loop_config, loop_class=BracketedLoop)


PROBE_CHUNK = 20  # steps of the loop, then as many bare steps over the same batches, in turn


class ProbedLoop(Loop):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.manual_seed(self.job.seed)  # as Loop seeds its model: the same initial weights
        self.bare = KanervaPlusPlus(self.mcfg).to(self.device)
        self.bare_opt, self.bare_sched = optim.build(self.bare.parameters(), self.job.train)
        self.chunk: list[tuple[int, torch.Tensor]] = []  # (step, batch) of the loop's current chunk
        self.loop_step_cpu_s = 0.0  # train_step's thread time in the loop's current chunk
        self.bare_wall_s, self.bare_steps, self.ratios = 0.0, 0, []
        self.bare_loss = float("nan")

    def _step(self, keys, x):
        step, cpu = self.step, time.thread_time()
        out = super()._step(keys, x)
        self.loop_step_cpu_s += time.thread_time() - cpu
        self.chunk.append((step, x))
        if len(self.chunk) == PROBE_CHUNK:
            self._probe()
        return out

    def _probe(self) -> None:
        """The chunk's batches again, through the bare model's train_step alone."""
        t = self.job.train
        wall, cpu = time.perf_counter(), time.thread_time()
        for step, x in self.chunk:
            r = train_step(self.bare, self.bare_opt, self.bare_sched, x, beta=kl_beta(step, self.mcfg.objective),
                           grad_clip=t.grad_clip, precision=t.precision,
                           noise_seed=hash_seed(self.job.seed, self.session.rank, step))
        self.bare_wall_s += time.perf_counter() - wall
        self.ratios.append(self.loop_step_cpu_s / (time.thread_time() - cpu))
        self.bare_steps += len(self.chunk)
        self.bare_loss = r.terms["loss"]  # a device tensor: read once, at the end
        self.chunk, self.loop_step_cpu_s = [], 0.0

    def run(self) -> dict[str, Any]:
        result = super().run()
        if self.ratios:
            # as the paired ratio's steady window: Ray is still starting beside the first chunks
            steady = self.ratios[len(self.ratios) // 4:]
            quartiles = statistics.quantiles(steady, n=4) if len(steady) > 1 else [steady[0]] * 3
            self.tracker.log_metrics({"probe/bare_wall_s": self.bare_wall_s, "probe/bare_steps": self.bare_steps,
                                      "probe/step_in_loop_over_bare": statistics.median(steady),
                                      "probe/step_in_loop_over_bare_q1": quartiles[0],
                                      "probe/step_in_loop_over_bare_q3": quartiles[2],
                                      "probe/bare_final_loss": float(self.bare_loss)}, step=0)
            self.tracker.flush()  # rank 0's (the others' tracker is inactive)
        return result


def probe_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker of `--interleaved` (driver.RunOptions.worker)."""
    session.train_worker(loop_config, loop_class=ProbedLoop)
