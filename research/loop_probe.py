"""The training loop with bare steps timed inside it, in turn with its own: the `--interleaved` measure of
research.benchmark_loop.

`ProbedLoop` is the real `Loop`; after every PROBE_CHUNK of its steps it runs `train_step` of a second model
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
