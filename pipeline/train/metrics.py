"""The loop's step metrics: kept on the device between log steps, read on the host once per `log_every` steps.

Per step (`after_step`) only device ops run: the count of skipped (non-finite) steps, the current and longest run
of skips, the first skipped step of the window. At a log step (`collect`) everything the ranks must agree on goes
into one vector: the loss terms and gradient norm (averaged over ranks; the skip counters too, which DDP makes
equal on every rank), rank 0's seconds since its last report and every rank's count of reports still in flight (so
every rank takes the same report decision: a report is a barrier, one rank skipping it would hang the rest), and in slots of its own per rank the seconds it
waited for data and, on GPUs, its peak memory and utilisation (NVML), so a starving rank shows in MLflow. One all-reduce and one host read: the loop's only host sync between log steps.

Host-side timings of the window ride along: images/s, the time the training thread waited for data
(`perf/data_wait_s`, with its share of the window), the host time inside train_step (`perf/step_host_s` per step,
with its share: what is left of the window is the loop's own), the training thread's context switches per step, and
the loop's wall and CPU time so far.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kpp.objective import keys_at_floor

PER_RANK = 4  # all-reduce slots of each rank: data wait, GPU peak memory, GPU utilisation, reports in flight

try:
    import resource
    _RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux only
except ImportError:  # not a Unix
    _RUSAGE_THREAD = None


def thread_switches() -> int | None:
    """Context switches of the calling thread so far (voluntary + involuntary; Linux), None where not reported.
    A training thread that is switched out mid-step (another thread of its process wants the GIL, another
    process wants its core) runs its step slower even with nothing to wait for: the count says so beside the time."""
    if _RUSAGE_THREAD is None:
        return None
    usage = resource.getrusage(_RUSAGE_THREAD)
    return usage.ru_nvcsw + usage.ru_nivcsw


@dataclass
class Window:
    """The host clock of the steps since the last log step: where the time went (waiting for data, inside
    train_step) and the training thread's context switches at its start."""
    t: float
    step: int
    data_wait_s: float = 0.0
    step_host_s: float = 0.0  # host seconds inside train_step (on a GPU: launching the step, not running it)
    switches: int | None = field(default_factory=thread_switches)


class StepMetrics:
    """The loop's metrics: device-side counters per step, the reduction at log steps, the throughput window, the
    report clock (a metrics-only report is due once `min_report_interval_s` have passed on rank 0 since the last
    report and, where reports cost time (an interval > 0), no rank has one still in flight) and the idle keys.

    Why the second rule: Ray's controller takes one report per worker per health-check interval, so reports made
    faster than that queue up behind it, and a checkpoint then waits in the training thread for room (measured:
    300-900 ms stalls at a checkpoint every 1.1 s with a metrics report between, against a 3 ms state copy).
    A metrics-only report carries only the driver's progress line: skipping it while one is in flight loses nothing
    (MLflow gets every log step from rank 0 regardless)."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device, key_terms: int, warmup_steps: int,
                 min_report_interval_s: float = 0.0):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.key_terms = key_terms
        self.min_report_interval_s = min_report_interval_s
        self.keys = IdleKeys(warmup_steps)
        zero = torch.zeros((), device=device)
        self._skips, self._run, self._run_max = zero.clone(), zero.clone(), zero.clone()
        self._first_bad = torch.full((), -1.0, device=device)
        self.skipped = 0  # non-finite steps skipped over the whole job (host; updated at each collect)
        self.window = Window(time.perf_counter(), 0)
        self.last_report_t = time.perf_counter()  # rank 0's clock of reports

    def start(self, step: int) -> None:
        self.window = Window(time.perf_counter(), step)

    def after_step(self, step: int, ok: torch.Tensor) -> None:
        """Count a skipped step on the device (no host sync). `step`: the step just trained (1-based)."""
        bad = (~ok).float()
        self._skips += bad
        self._run.add_(1).mul_(bad)  # consecutive skips so far
        torch.maximum(self._run_max, self._run, out=self._run_max)
        fresh = (self._first_bad < 0) & (bad > 0)
        self._first_bad.copy_(torch.where(fresh, float(step), self._first_bad))

    def collect(self, step: int, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                episodes_per_step: int, reports_in_flight: int = 0) -> dict[str, Any]:
        """The window's metrics, the same on every rank (a collective: every rank calls it at the same steps).
        reports_in_flight: this rank's reports not yet finished (Checkpointer.pending)."""
        since = time.perf_counter() - self.last_report_t if self.rank == 0 else 0.0
        names = list(terms)  # the same order on every rank
        mean_part = [terms[k].float() for k in names] + [grad_norm.float(), self._skips, self._run_max,
                                                          self._first_bad]
        # per rank, in its own slots (the sum fills them all): data wait, on GPUs peak memory and utilisation, and
        # reports in flight (their most on any rank decides whether a checkpoint would wait for room)
        slots = torch.zeros(1 + PER_RANK * self.world_size, device=self.device)
        slots[0] = since
        mine = 1 + PER_RANK * self.rank
        slots[mine] = self.window.data_wait_s
        slots[mine + 3] = reports_in_flight
        cuda = self.device.type == "cuda"
        if cuda:
            slots[mine + 1] = torch.cuda.max_memory_allocated(self.device) / 2**20
            slots[mine + 2] = _utilisation(self.device)
        vec = torch.cat([torch.stack(mean_part).to(self.device), slots])
        if self.world_size > 1:
            dist.all_reduce(vec)
            vec[:len(mean_part)] /= self.world_size
        values = vec.tolist()  # the host sync
        now = time.perf_counter()
        w = self.window
        steps = step - w.step
        seconds = max(now - w.t, 1e-9)
        m: dict[str, Any] = {f"train/{k}": v for k, v in zip(names, values)}
        grad, skips, run_max, first_bad = values[len(names):len(mean_part)]
        self.skipped += int(round(skips))
        episodes_per_s = steps * episodes_per_step * self.world_size / seconds
        m.update({"train/grad_norm": grad, "train/nonfinite_skipped": self.skipped,
                  "perf/episodes_per_s": episodes_per_s, "perf/data_wait_s": w.data_wait_s,
                  "perf/data_wait_share": w.data_wait_s / seconds,
                  # the rest of the window's time is the loop's own: metrics, validation, checkpoints, data hand-off
                  "perf/step_host_s": w.step_host_s / max(steps, 1), "perf/step_host_share": w.step_host_s / seconds})
        switches = thread_switches()
        if switches is not None and w.switches is not None:
            m["perf/context_switches_per_step"] = (switches - w.switches) / max(steps, 1)
        in_flight = []  # per rank
        for r in range(self.world_size):
            wait, mem, util, rank_in_flight = values[len(mean_part) + 1 + PER_RANK * r:
                                                     len(mean_part) + 1 + PER_RANK * (r + 1)]
            in_flight.append(int(round(rank_in_flight)))
            if self.world_size > 1:
                m[f"perf/data_wait_s_rank{r}"] = wait
            if cuda:
                m[f"perf/gpu_peak_mem_mb_rank{r}"] = mem
                if util >= 0:
                    m[f"perf/gpu_util_rank{r}"] = util
        self.keys.update(step, [m[f"train/kl_y_key{k}"] for k in range(self.key_terms)], steps)
        self._skips.zero_()
        self._run_max.copy_(self._run)
        self._first_bad.fill_(-1.0)
        self.window = Window(now, step)
        since_report = values[len(mean_part)]
        report_due = since_report >= self.min_report_interval_s and not (self.min_report_interval_s > 0
                                                                         and any(in_flight))
        return {"metrics": m, "report_due": report_due, "reports_in_flight_most": max(in_flight),
                "window_skips": int(round(skips)), "run_max": int(round(run_max)), "first_bad": int(first_bad)}

    def reported(self) -> None:
        """A report was made (every rank, at the same step): the report clock starts again."""
        self.last_report_t = time.perf_counter()

    @property
    def key_kl_max(self) -> list[float]:
        return self.keys.max_per_key

    @key_kl_max.setter
    def key_kl_max(self, values: list[float]) -> None:
        self.keys.max_per_key = list(values)

    def idle_keys(self, free_bits: float) -> list[int]:
        return self.keys.at_floor(free_bits)


class IdleKeys:
    """Each key's largest KL_y since the KL warm-up ended: a key that never left the free-bits floor carries no
    address (kpp.objective.keys_at_floor). The distributed loop feeds it at log steps, the in-process trainer at
    every step."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.max_per_key: list[float] = []

    def update(self, step: int, per_key: list[float], window_steps: int = 1) -> None:
        """`per_key`: KL_y per key of the window ending at `step` (1-based, the step just trained)."""
        restart = step - window_steps < self.warmup_steps <= step
        if not self.max_per_key or restart:  # judged from the end of the warm-up on
            self.max_per_key = list(per_key)
        self.max_per_key = [max(a, b) for a, b in zip(self.max_per_key, per_key)]

    def at_floor(self, free_bits: float) -> list[int]:
        return keys_at_floor(self.max_per_key, free_bits)


def _utilisation(device: torch.device) -> float:
    """GPU utilisation in percent over NVML's last sample period (nvidia-ml-py), -1 where NVML is not there."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unsupported: the memory figure still stands
        return -1.0
