"""Probe: KeyWriter's write layer scaled by GAIN at initialisation (0: the memory starts as the base map, as with
writer=none). From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_write_gain.py 0.0 --name early-key-g0.0 \
        --source ../shared/data/binarized_mnist --steps 250 --threads 1 --test-episodes 32 --iwae-samples 8 \
        model.memory.writer=key model.objective.kl_warmup_steps=100
"""
import sys
import torch
from kpp import memory
orig = memory.KeyWriter.__init__
gain = float(sys.argv.pop(1))
def init(self, cfg):
    orig(self, cfg)
    with torch.no_grad():
        self.block.weight.mul_(gain)
        self.block.bias.mul_(gain)
memory.KeyWriter.__init__ = init
from research import memory_experiment
memory_experiment.main()
