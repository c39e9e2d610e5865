"""Probe: a K++ memory whose read-back needs nothing learned at step 0, as the Kanerva Machine's does (its read is
the analytic posterior of its write; at 250 steps it is the one memory ahead of the VAE, docs/results.md).

Each image also writes its posterior code z_mean, as a block P z_mean (P: d_z -> C_m x w x w, orthonormal columns),
at its key means; the prior's mean gets P^T of the mean of the K read blocks added. A read that lands on x_t's
write alone then returns P z_mean and the prior's mean starts at z_mean: x_t reads back its own code from step 0.
Writes that overlap add up, so each image also starts at an address of its own (the per-position offsets of
probe_key_positions.py, SPREAD as there), and sharp keys are the override model.keys.init_logvar. P and P^T are
learned from that start. From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_code_write.py 1.0 --name early-codewrite \
        --source ../shared/data/binarized_mnist --steps 250 --threads 1 --test-episodes 32 --iwae-samples 8 \
        model.memory.writer=key model.objective.kl_warmup_steps=100 model.keys.init_logvar=-2
"""
import dataclasses
import math
import sys

import torch

from kpp import model
from kpp.memory import key_to_affine, place, read

spread = float(sys.argv.pop(1))
KeyModel = model.KanervaPlusPlus
orig_init, orig_encode, orig_write = KeyModel.__init__, KeyModel.encode, KeyModel.write


def grid(t: int, k: int) -> torch.Tensor:
    side = math.ceil(math.sqrt(t * k))
    lin = torch.linspace(-0.75, 0.75, side)
    order = torch.randperm(side * side, generator=torch.Generator().manual_seed(0))[: t * k]
    offset = torch.zeros(t, k, 3)
    offset[..., 1:] = spread * torch.atanh(torch.cartesian_prod(lin, lin)[order]).view(t, k, 2)
    return offset


def init(self, cfg):
    orig_init(self, cfg)
    c, w, dz = cfg.memory.channels, cfg.read.window, cfg.latent.dim
    self.key_position = torch.nn.Parameter(grid(cfg.episode_length, cfg.keys.num_reads))
    q, _ = torch.linalg.qr(torch.randn(c * w * w, dz, generator=torch.Generator().manual_seed(1)))
    self.code_to_block = torch.nn.Parameter(q.clone())      # P [C w w, d_z], orthonormal columns
    self.block_to_code = torch.nn.Parameter(q.t().clone())  # P^T: its pseudo-inverse at init


def encode(self, x):
    enc = orig_encode(self, x)
    return dataclasses.replace(enc, key_mean=enc.key_mean + self.key_position[: enc.key_mean.shape[1]])


def write(self, enc):
    memory = orig_write(self, enc)
    cfg = self.cfg
    b, t, k = enc.key_mean.shape[:3]
    c, w = cfg.memory.channels, cfg.read.window
    blocks = (enc.z_mean @ self.code_to_block.t()).view(b, t, 1, c, w, w).expand(b, t, k, c, w, w)
    theta = key_to_affine(enc.key_mean, cfg.keys.min_scale, cfg.keys.max_scale).view(b, t * k, 2, 3)
    placed = place(blocks.reshape(b, t * k, c, w, w), theta, cfg.memory.height, cfg.memory.width,
                   cfg.memory.placement, group=k)
    return memory + placed.sum(1)


def read_prior(self, memory, keys):
    b, t, k, _ = keys.shape
    theta = key_to_affine(keys, self.cfg.keys.min_scale, self.cfg.keys.max_scale)
    if memory.dim() == 5:
        blocks = read(memory.flatten(0, 1), theta.view(b * t, k, 2, 3), self.cfg.read.window)
    else:
        blocks = read(memory, theta.view(b, t * k, 2, 3), self.cfg.read.window)
    blocks = blocks.reshape(b * t, k, *blocks.shape[2:])
    mean, logvar = self.z_prior(blocks, keys.reshape(b * t, k, 3))
    mean = mean + blocks.mean(1).flatten(1) @ self.block_to_code.t()
    return mean.view(b, t, -1), logvar.view(b, t, -1)


KeyModel.__init__, KeyModel.encode, KeyModel.write, KeyModel.read_prior = init, encode, write, read_prior
from research import memory_experiment  # noqa: E402

memory_experiment.main()
