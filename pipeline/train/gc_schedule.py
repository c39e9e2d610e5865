"""Python's garbage collector on the training loop's schedule, not the allocator's (`train.gc_every`).

Why: a Ray Train worker holds 500-700 thousand Python objects (Ray, MLflow, pyarrow, the model). CPython starts a
collection from whatever allocates when its counters run over, which in the step loop is the training step, and
a full one walks every object: 180-600 ms each in a worker on this CPU (measured with gc.callbacks), tens of
steps' worth of GPU time. So for the step loop the objects alive at its start are frozen (gc.freeze: no
collection walks them again), automatic collection is off, and the loop collects the two young generations every
`every` steps (only what the steps made since) and all that is not frozen at each validation, itself a pause
already. torchtitan (`training.gc_freq`) and Megatron-LM (`--manual-gc`) do the same. Leaving restores
automatic collection and unfreezes.
"""
from __future__ import annotations

import gc


class GcSchedule:
    """`with GcSchedule(every) as collector:` around the step loop; `collector.step(step)` after each step,
    `collector.full()` at validation. every=0: Python's own automatic collection, and every call a no-op."""

    def __init__(self, every: int):
        self.every = every
        self.collections = 0  # the schedule's own (not the one at entry)
        self._was_enabled = True

    def __enter__(self) -> "GcSchedule":
        if self.every:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()  # once: what is garbage now is not frozen with the rest
            gc.freeze()
        return self

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self._collect(1)

    def full(self) -> None:
        if self.every:
            self._collect(2)

    def _collect(self, generation: int) -> None:
        gc.collect(generation)
        self.collections += 1

    def __exit__(self, *exc) -> None:
        if self.every:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
