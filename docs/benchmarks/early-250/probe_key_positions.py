"""Probe: each image of the episode starts with its own address. A learned offset per episode position and read,
[T, K, 3], is added to the key means; it starts as a grid that spreads the T x K reads (and so the writes, which
sit at the key means) over the memory, SPREAD x atanh of points in [-0.75, 0.75]^2 on the two shift coordinates.
The prior p(y) stays N(0, I): the offsets are paid for in KL_y like any key mean. Hypothesis: at the default init
every key mean is ~0, so all 16 images write to and read from one place and a read returns the episode's sum;
with distinct addresses from step 0, x_t's read returns its own write and p(z | reads) can use it early.

The offset is created after every other module, so the rest of the model starts from the same weights as the
run without it (same seed). Leave-one-out re-encodes T-1 images and uses the first T-1 offsets (an approximation
the probe accepts). From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_key_positions.py 1.0 --name early-key-pos1 \
        --source ../shared/data/binarized_mnist --steps 250 --threads 1 --test-episodes 32 --iwae-samples 8 \
        model.memory.writer=key model.objective.kl_warmup_steps=100
"""
import dataclasses
import math
import sys

import torch

from kpp import model

spread = float(sys.argv.pop(1))
orig_init, orig_encode = model.KanervaPlusPlus.__init__, model.KanervaPlusPlus.encode


def grid(t: int, k: int) -> torch.Tensor:
    n = t * k
    side = math.ceil(math.sqrt(n))
    lin = torch.linspace(-0.75, 0.75, side)
    points = torch.cartesian_prod(lin, lin)[torch.randperm(side * side, generator=torch.Generator().manual_seed(0))[:n]]
    offset = torch.zeros(t, k, 3)
    offset[..., 1:] = spread * torch.atanh(points).view(t, k, 2)
    return offset


def init(self, cfg):
    orig_init(self, cfg)
    self.key_position = torch.nn.Parameter(grid(cfg.episode_length, cfg.keys.num_reads))


def encode(self, x):
    enc = orig_encode(self, x)
    t = enc.key_mean.shape[1]
    return dataclasses.replace(enc, key_mean=enc.key_mean + self.key_position[:t])


model.KanervaPlusPlus.__init__ = init
model.KanervaPlusPlus.encode = encode
from research import memory_experiment  # noqa: E402

memory_experiment.main()
