"""Probe: open the memory's written part gradually. M = base + g * (sum of the episode's writes), with
g = min(1, training forward passes / RAMP), so K++ starts as the no-memory model and the writes come in over RAMP
steps (evaluation always reads the full memory). From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_write_gate.py 500 --name gate500-1000 \\
        --source ../shared/data/binarized_mnist --steps 1000 --threads 1 --test-episodes 32 --iwae-samples 8 \\
        model.memory.writer=key model.objective.kl_warmup_steps=400
"""
import sys

from kpp import memory

ramp = float(sys.argv.pop(1))


def forward(self, embedding, key_mean):
    if self.training:
        self.passes = getattr(self, "passes", 0) + 1
    gate = min(1.0, getattr(self, "passes", 0) / ramp) if self.training else 1.0
    return self.base + gate * self.contributions(embedding, key_mean).sum(1)


memory.KeyWriter.forward = forward
from research import memory_experiment  # noqa: E402

memory_experiment.main()
