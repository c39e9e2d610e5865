"""Progress lines on the driver console: step, loss, throughput and ETA after every report.

A Ray Train V2 UserCallback runs in the Train controller actor, whose stdout Ray forwards to the driver, so the
lines appear where the job was started (prefixed by Ray with the controller's name).
"""
from __future__ import annotations

import time

from ray.train import UserCallback


class ProgressPrinter(UserCallback):
    def __init__(self):
        self._t0: float | None = None
        self._step0 = 0

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if "step" not in m:
            return
        step, total = int(m["step"]), int(m.get("max_steps", 0))
        now = time.monotonic()
        if self._t0 is None:  # the first report of this controller (a resume starts mid-way)
            self._t0, self._step0 = now, step
        rate = (step - self._step0) / max(now - self._t0, 1e-9)
        eta = f"{(total - step) / rate:.0f}s" if rate > 0 and total else "?"
        line = (f"[train] step {step}/{total}  loss {m.get('train/loss', float('nan')):.3f}  "
                f"{m.get('perf/episodes_per_s', 0):.1f} episodes/s  ETA {eta}")
        if "test/neg_elbo" in m:
            line += "  test -ELBO: " + test_bounds(m)
        if checkpoint is not None:
            line += "  [checkpoint]"
        print(line, flush=True)


def test_bounds(m) -> str:
    """The three test -ELBOs of a final report, labelled by what the memory scoring x_t holds: the images before
    it (chain: bounds -ln p(X)/T), the other images (leave-one-out), x_t itself too (memory-conditional, the
    paper's)."""
    nan = float("nan")
    return (f"chain {m.get('test/chain_neg_elbo', nan):.3f}, leave-one-out {m.get('test/loo_neg_elbo', nan):.3f}, "
            f"memory-conditional (paper's) {m.get('test/neg_elbo', nan):.3f}")
