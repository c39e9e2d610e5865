"""Probe: the written part of the memory behind a learned gate that starts closed, M = base + g * sum_t write_t,
g a parameter initialised at 0 (SHAPE "scalar": one g; "channel": one per memory channel). At step 0 the model is
the no-memory model (M = the base map) and the write weights get no gradient; g opens only as far as the
episode's (random, then trained) writes lower the loss. Unlike probe_write_gate.py (g scheduled from 0 to 1, which
forced the writes in) and probe_write_gain.py (the write weights started at 0 and were trained from the first
step), nothing here opens the memory before it pays. From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_write_learned_gate.py scalar --name early-key-lgate \
        --source ../shared/data/binarized_mnist --steps 250 --threads 1 --test-episodes 32 --iwae-samples 8 \
        model.memory.writer=key model.objective.kl_warmup_steps=100
"""
import sys

import torch

from kpp import memory

shape = sys.argv.pop(1)
orig_init = memory.KeyWriter.__init__


def init(self, cfg):
    orig_init(self, cfg)
    self.gate = torch.nn.Parameter(torch.zeros(1, cfg.memory.channels if shape == "channel" else 1, 1, 1))


def forward(self, embedding, key_mean):
    return self.base + self.gate * self.contributions(embedding, key_mean).sum(1)


memory.KeyWriter.__init__ = init
memory.KeyWriter.forward = forward
from research import memory_experiment  # noqa: E402

memory_experiment.main()
