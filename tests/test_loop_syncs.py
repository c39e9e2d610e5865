"""Host syncs of the training loop: at most one per `log_every` steps (issue: the GPU path at full speed).

On a GPU every read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `float(t)`, ...) makes the CPU
wait for the GPU to finish the queued work, so the next batch's copy and the next step's kernel launches can no
longer overlap the current step. On the CPU there is no queue, but the same calls are the sync points: they are
counted here with a TorchFunctionMode, which sees every such call on the training thread, and attributed to the
step the loop is at. Reads the data stream makes of its own host batches before the copy to the device (e.g.
kpp.data.to_model_input's range check) are not device syncs and are left out.
"""
import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.data.train_data import load_data
from pipeline.train import config
from pipeline.train.loop import LocalSession, Loop
from tests.model_helpers import tiny_model_overrides

TINY = [*tiny_model_overrides(),
        "data.batch_episodes=4", "data.valid_episodes=4", "data.test_episodes=4", "eval.iwae_samples=2",
        "train.warmup_steps=2", "tracking.enabled=false"]
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__format__"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values by the step the loop is at."""

    def __init__(self, loop):
        super().__init__()
        self.loop, self.by_step = loop, collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS and not self.loop.reading_data:
            self.by_step[self.loop.step] += 1
        return func(*args, **(kwargs or {}))


class MarkedLoop(Loop):
    """The loop, saying when it is pulling the next host batch from its stream."""

    reading_data = False

    def _on_device(self, batches):
        inner = super()._on_device(batches)
        while True:
            self.reading_data = True
            try:
                batch = next(inner)
            except StopIteration:
                return
            finally:
                self.reading_data = False
            yield batch


def _reads(tmp_path, *overrides):
    torch.set_num_threads(1)
    cfg = config.load(None, [*TINY, *overrides])
    data = load_data("digits", "", 4, 4, 4, 4, 0, 0, 1)[:3]
    loop = MarkedLoop(cfg, LocalSession(tmp_path), data=data)
    counter = HostReads(loop)
    with counter:
        loop.run()
    return counter.by_step, cfg


@pytest.mark.parametrize("log_every", [10, 5])
def test_at_most_one_host_sync_per_log_every_steps(tmp_path, log_every):
    steps = 30
    by_step, _ = _reads(tmp_path, f"train.max_steps={steps}", f"train.log_every={log_every}",
                        "eval.every_steps=0", "checkpoint.every_steps=0")
    # Between the end of step 1 and the last step (the step-0 baseline validation and the final test bound are
    # evaluations, not training steps): the reads made while the loop stood at steps 1 .. steps-1.
    reads = sum(n for s, n in by_step.items() if 1 <= s < steps)
    log_steps = len([s for s in range(1, steps) if s % log_every == 0])
    assert reads <= log_steps, dict(sorted(by_step.items()))
    assert reads >= 1  # the counter sees the log steps' read: it would see a per-step one


def test_validation_and_checkpoints_add_no_sync_to_the_other_steps(tmp_path):
    """A checkpoint step copies the state (a sync of its own, allowed there); the steps around it stay sync-free."""
    steps, every = 24, 8
    by_step, _ = _reads(tmp_path, f"train.max_steps={steps}", "train.log_every=4", f"eval.every_steps={every}",
                        f"checkpoint.every_steps={every}", "checkpoint.keep_by=recent")
    quiet = [s for s in range(1, steps) if s % 4]
    assert all(by_step.get(s, 0) == 0 for s in quiet), dict(sorted(by_step.items()))
