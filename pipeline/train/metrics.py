"""The loop's step metrics: kept on the device between log steps, read on the host once per `log_every` steps.

Per step (`after_step`) only device ops run: the count of skipped (non-finite) steps, the current and longest run
of skips, the first skipped step of the window. At a log step (`collect`) everything the ranks must agree on goes
into one vector: the loss terms and gradient norm (averaged over ranks; the skip counters too, which DDP makes
equal on every rank), rank 0's seconds since its last report (so every rank takes the same report decision: a
report is a barrier, one rank skipping it would hang the rest), and in slots of its own per rank the seconds it
waited for data and, on GPUs, its peak memory and utilisation (NVML), so a starving rank shows in MLflow. One all-reduce and one host read: the loop's only host sync between log steps.

Host-side timings of the window ride along: images/s, the time the training thread waited for data
(`perf/data_wait_s`, with its share of the window), and the loop's wall and CPU time so far.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kpp.objective import keys_at_floor


@dataclass
class Window:
    """The host clock of the steps since the last log step."""
    t: float
    step: int
    data_wait_s: float = 0.0


class StepMetrics:
    def __init__(self, *, rank: int, world_size: int, device: torch.device, key_terms: int, warmup_steps: int):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.key_terms, self.warmup_steps = key_terms, warmup_steps
        zero = torch.zeros((), device=device)
        self._skips, self._run, self._run_max = zero.clone(), zero.clone(), zero.clone()
        self._first_bad = torch.full((), -1.0, device=device)
        self.skipped = 0  # non-finite steps skipped over the whole job (host; updated at each collect)
        self.key_kl_max: list[float] = []  # each key's largest logged KL_y: a key that never left the floor is idle
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
                episodes_per_step: int) -> dict[str, Any]:
        """The window's metrics, the same on every rank (a collective: every rank calls it at the same steps)."""
        since = time.perf_counter() - self.last_report_t if self.rank == 0 else 0.0
        names = list(terms)  # the same order on every rank
        mean_part = [terms[k].float() for k in names] + [grad_norm.float(), self._skips, self._run_max,
                                                          self._first_bad]
        # per rank, in its own slots (the sum fills them all): data wait, and on GPUs peak memory and utilisation
        slots = torch.zeros(1 + 3 * self.world_size, device=self.device)
        slots[0] = since
        mine = 1 + 3 * self.rank
        slots[mine] = self.window.data_wait_s
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
                  "perf/data_wait_share": w.data_wait_s / seconds})
        for r in range(self.world_size):
            wait, mem, util = values[len(mean_part) + 1 + 3 * r:len(mean_part) + 4 + 3 * r]
            if self.world_size > 1:
                m[f"perf/data_wait_s_rank{r}"] = wait
            if cuda:
                m[f"perf/gpu_peak_mem_mb_rank{r}"] = mem
                if util >= 0:
                    m[f"perf/gpu_util_rank{r}"] = util
        self._track_idle_keys(step, [m[f"train/kl_y_key{k}"] for k in range(self.key_terms)], steps)
        self._skips.zero_()
        self._run_max.copy_(self._run)
        self._first_bad.fill_(-1.0)
        self.window = Window(now, step)
        return {"metrics": m, "report_due_s": values[len(mean_part)], "window_skips": int(round(skips)),
                "run_max": int(round(run_max)), "first_bad": int(first_bad)}

    def _track_idle_keys(self, step: int, per_key: list[float], window_steps: int) -> None:
        restart = step - window_steps < self.warmup_steps <= step
        if not self.key_kl_max or restart:  # idle keys are judged from the end of the KL warm-up on
            self.key_kl_max = per_key
        self.key_kl_max = [max(a, b) for a, b in zip(self.key_kl_max, per_key)]

    def idle_keys(self, free_bits: float) -> list[int]:
        return keys_at_floor(self.key_kl_max, free_bits)


def _utilisation(device: torch.device) -> float:
    """GPU utilisation in percent over NVML's last sample period (nvidia-ml-py), -1 where NVML is not there."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unsupported: the memory figure still stands
        return -1.0
