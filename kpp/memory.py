"""The episodic memory: keys in R^3, the spatial-transformer read f_ST, and the deterministic writers f_mem.

A key y = (y_s, y_x, y_y) is squashed into an affine read grid theta = [[s, 0, t_x], [0, s, t_y]] with
s in [min_scale, max_scale] (a fraction of the memory side) and t in [-1, 1]: every read is a local block.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from kpp.config import KanervaConfig


def key_to_affine(y: torch.Tensor, min_scale: float, max_scale: float) -> torch.Tensor:
    """y [..., 3] -> theta [..., 2, 3] of the read grid (memory coords = s * window coords + t)."""
    s = min_scale + (max_scale - min_scale) * torch.sigmoid(y[..., 0])
    tx, ty = torch.tanh(y[..., 1]), torch.tanh(y[..., 2])
    zero = torch.zeros_like(s)
    row0 = torch.stack([s, zero, tx], dim=-1)
    row1 = torch.stack([zero, s, ty], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """The inverse of a scale-and-shift grid: window coords = (memory coords - t) / s."""
    s = theta[..., 0, 0]
    t = theta[..., :, 2]
    inv = torch.zeros_like(theta)
    inv[..., 0, 0] = 1.0 / s
    inv[..., 1, 1] = 1.0 / s
    inv[..., :, 2] = -t / s.unsqueeze(-1)
    return inv


def read(memory: torch.Tensor, theta: torch.Tensor, window: int) -> torch.Tensor:
    """f_ST. memory [B, C_m, H_m, W_m], theta [B, N, 2, 3] (N reads per episode) -> blocks [B, N, C_m, w, w]."""
    b, n = theta.shape[:2]
    c = memory.shape[1]
    grid = F.affine_grid(theta.reshape(b * n, 2, 3), [b * n, c, window, window], align_corners=False)
    # All N reads of an episode sample the same memory: one grid_sample per episode over the N grids stacked along
    # the output's height, instead of N copies of the memory. The same bilinear weights and products (exact), with
    # no [B * N, C_m, H_m, W_m] copy forward and no sum of N gradients backward (about a third less time here).
    blocks = F.grid_sample(memory, grid.view(b, n * window, window, 2), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return blocks.view(b, c, n, window, window).transpose(1, 2)


def place(blocks: torch.Tensor, theta: torch.Tensor, height: int, width: int, method: str = "sample",
          group: int = 1) -> torch.Tensor:
    """The write that `read` undoes: put each block where a read with theta finds it, zero outside the block's
    region. blocks [B, N, C, w, w], theta [B, N, 2, 3] -> [B, N // group, C, H_m, W_m], each map the sum of
    `group` consecutive placed blocks (an image's K writes).

    "splat" is the adjoint of the read, normalised by coverage: each of the w x w samples a read at
    theta would take is spread bilinearly onto the memory pixels around its position, and a pixel holds the
    weighted mean of the samples that reached it (divided by max(coverage, 1), so the block's edge tapers off
    continuously in theta). A read at the same theta then returns the block within interpolation error at every
    scale, even where the read's region spans fewer memory pixels than the window has samples.
    "sample" (the default: it trained to a 3 nats/image better bound) resamples the block at the memory pixel
    centres (grid_sample with the inverse transform): exact where the region spans w memory pixels on aligned
    grids; at small scales it keeps only a few of the block's samples (a constant block reads back at a quarter
    of its value at scale 0.1 of a 16-pixel memory)."""
    b, n, c = blocks.shape[:3]
    if method == "sample":
        inv = invert_affine(theta).reshape(b * n, 2, 3)
        grid = F.affine_grid(inv, [b * n, c, height, width], align_corners=False)
        placed = F.grid_sample(blocks.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return placed.view(b, n // group, group, c, height, width).sum(2)
    return splat(blocks, theta, height, width, group)


def splat(blocks: torch.Tensor, theta: torch.Tensor, height: int, width: int, group: int = 1) -> torch.Tensor:
    """Coverage-normalised transpose of `read` (see `place`). Differentiable in the blocks and in theta."""
    b, n, c, wh, ww = blocks.shape
    writes, samples, pixels = b * n, wh * ww, height * width
    grid = F.affine_grid(theta.reshape(writes, 2, 3), [writes, c, wh, ww], align_corners=False).view(writes, samples, 2)
    # Continuous pixel coordinates of each sample, in grid_sample's align_corners=False convention, and the four
    # pixels around it with their bilinear weights (zero for pixels outside the memory).
    u = ((grid[..., 0] + 1) * width - 1) / 2
    v = ((grid[..., 1] + 1) * height - 1) / 2
    u0, v0 = u.floor().detach(), v.floor().detach()
    fu, fv = u - u0, v - v0
    xs = torch.cat([u0, u0 + 1, u0, u0 + 1], dim=1)  # [writes, 4 * samples]
    ys = torch.cat([v0, v0, v0 + 1, v0 + 1], dim=1)
    weight = torch.cat([(1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv], dim=1)
    weight = weight * ((xs >= 0) & (xs < width) & (ys >= 0) & (ys < height))
    index = (ys.clamp(0, height - 1) * width + xs.clamp(0, width - 1)).long()
    # Normalise per write: each pixel's weights of this write sum to its coverage.
    coverage = weight.new_zeros(writes, pixels).scatter_add(1, index, weight)
    coef = weight / coverage.clamp(min=1.0).gather(1, index)
    # One index_add of every weighted sample into its map (one map per `group` writes), channels leading.
    maps = writes // group
    target = (index + (torch.arange(writes, device=index.device) // group).unsqueeze(1) * pixels).flatten()
    values = blocks.reshape(writes, c, samples).repeat(1, 1, 4) * coef.unsqueeze(1)  # [writes, C, 4 * samples]
    out = values.new_zeros(c, maps * pixels).index_add(1, target, values.permute(1, 0, 2).reshape(c, -1))
    return out.view(c, b, n // group, height, width).permute(1, 2, 0, 3, 4)


class KeyWriter(nn.Module):
    """Each image writes K blocks (one per read key) at its own posterior key means, summed over the episode on a
    learned base map. Deterministic in E; with no images written, M is the base map."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        m, w, k = cfg.memory, cfg.read.window, cfg.keys.num_reads
        self.cfg = cfg
        self.base = nn.Parameter(torch.zeros(1, m.channels, m.height, m.width))
        self.block = nn.Linear(cfg.encoder.embedding_dim, k * m.channels * w * w)

    def contributions(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        """Each image's write, [B, T, C_m, H_m, W_m]; the memory is the base map plus their sum over T."""
        b, t = embedding.shape[:2]
        m, w, k = self.cfg.memory, self.cfg.read.window, self.cfg.keys.num_reads
        blocks = self.block(embedding).view(b, t * k, m.channels, w, w)
        theta = key_to_affine(key_mean, self.cfg.keys.min_scale, self.cfg.keys.max_scale).view(b, t * k, 2, 3)
        return place(blocks, theta, m.height, m.width, m.placement, group=k)

    def combine(self, summed: torch.Tensor) -> torch.Tensor:
        """The memory from the sum of some images' writes [N, C_m, H_m, W_m] (zeros: the empty memory)."""
        return self.base + summed

    def forward(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        return self.combine(self.contributions(embedding, key_mean).sum(1))

    def empty(self, batch: int) -> torch.Tensor:
        """The memory of an episode with no images: the base map."""
        return self.base.expand(batch, -1, -1, -1)


class CodeWriter(nn.Module):
    """memory.content = "code": each image writes its code, one C_m vector over the whole block (constant, so a read
    anywhere on the block returns it), at each of its K key means, the region memory.write_span times its read's.
    The memory is the learned base map plus the sum of the writes, and one more channel, the coverage: how much
    of a write covers each pixel. KanervaPlusPlus.read_prior divides a read by its coverage, so a read that lands
    on x_t's own write alone returns x_t's code at full strength, whatever part of the write it covers. The code
    layer starts as q(z | X)'s (see KanervaPlusPlus.__init__): the code is the posterior's mean and log-variance."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        m = cfg.memory
        self.cfg = cfg
        self.base = nn.Parameter(torch.zeros(1, m.channels, m.height, m.width))
        # its gradient arrives as a slice of the (C_m + 1)-channel memory's: made contiguous, as DDP's buckets expect
        self.base.register_hook(lambda grad: grad.new_empty(grad.shape).copy_(grad))
        self.code = nn.Linear(cfg.encoder.embedding_dim, cfg.keys.num_reads * m.channels)

    def contributions(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        """Each image's write and its coverage, [B, T, C_m + 1, H_m, W_m]."""
        b, t = embedding.shape[:2]
        m, w, k = self.cfg.memory, self.cfg.read.window, self.cfg.keys.num_reads
        codes = self.code(embedding).view(b, t * k, m.channels, 1, 1)
        blocks = torch.cat([codes, torch.ones_like(codes[:, :, :1])], dim=2).expand(-1, -1, -1, w, w)
        theta = key_to_affine(key_mean, self.cfg.keys.min_scale, self.cfg.keys.max_scale).view(b, t * k, 2, 3)
        theta = torch.cat([theta[..., :2] * m.write_span, theta[..., 2:]], dim=-1)  # same centre, wider region
        return place(blocks, theta, m.height, m.width, m.placement, group=k)

    def combine(self, summed: torch.Tensor) -> torch.Tensor:
        """The memory from the sum of some images' writes and their coverage [N, C_m + 1, H_m, W_m]."""
        return self.empty(summed.shape[0]) + summed

    def forward(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        return self.combine(self.contributions(embedding, key_mean).sum(1))

    def empty(self, batch: int) -> torch.Tensor:
        """The base map, no coverage anywhere."""
        return torch.cat([self.base, torch.zeros_like(self.base[:, :1])], dim=1).expand(batch, -1, -1, -1)


# A read that covers less than this much of a write is scaled up by at most 1 / COVERAGE_FLOOR: a read that lands on
# no write returns the base map, not the base map blown up.
COVERAGE_FLOOR = 0.5


def normalise_by_coverage(blocks: torch.Tensor) -> torch.Tensor:
    """Read blocks of a code memory [..., C_m + 1, w, w] -> the same shape: the codes divided by the window's mean
    coverage (at least COVERAGE_FLOOR), so a read that lands on one write returns its code at full strength, then
    the coverage itself (how many writes the read landed on: what tells the prior one image from several)."""
    coverage = blocks[..., -1:, :, :].mean((-1, -2), keepdim=True).clamp(min=COVERAGE_FLOOR)
    return torch.cat([blocks[..., :-1, :, :] / coverage, blocks[..., -1:, :, :]], dim=-3)


def grid_key_offsets(cfg: KanervaConfig) -> torch.Tensor:
    """keys.layout = "grid": the initial key offsets [T, K, 3] that put read k of episode position t at the centre of
    cell t * K + k of a side x side grid tiling the memory (side = ceil(sqrt(T K))), its read's region 1 / side of
    the memory side divided by memory.write_span (so the write fills the cell). Key values are the inverses of
    key_to_affine's squashes; a scale outside [min_scale, max_scale] is clamped just inside."""
    t, k, keys = cfg.episode_length, cfg.keys.num_reads, cfg.keys
    side = math.ceil(math.sqrt(t * k))
    centres = -1.0 + (2.0 * torch.arange(side, dtype=torch.float32) + 1.0) / side
    cells = torch.cartesian_prod(centres, centres)[: t * k]  # row-major: (x, y) of cell t * K + k
    scale = 1.0 / (side * (cfg.memory.write_span if cfg.memory.content == "code" else 1.0))
    frac = (scale - keys.min_scale) / max(keys.max_scale - keys.min_scale, 1e-6)
    frac = min(max(frac, 0.01), 0.99)
    offsets = torch.empty(t, k, 3)
    offsets[..., 0] = math.log(frac / (1.0 - frac))
    offsets[..., 1:] = torch.atanh(cells.clamp(-0.99, 0.99)).view(t, k, 2)
    return offsets


class DenseWriter(nn.Module):
    """Each image writes a memory-sized map from its embedding (no pooling of the episode first), summed over the
    episode, then a conv stack. Keys do not steer where an image is written."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        m = cfg.memory
        self.cfg = cfg
        self.base = nn.Parameter(torch.zeros(1, m.channels, m.height, m.width))
        self.map = nn.Linear(cfg.encoder.embedding_dim, m.channels * m.height * m.width)
        self.mix = nn.Sequential(
            nn.Conv2d(m.channels, m.channels, 3, 1, 1), nn.ReLU(), nn.Conv2d(m.channels, m.channels, 3, 1, 1)
        )

    def contributions(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        m = self.cfg.memory
        b, t = embedding.shape[:2]
        return self.map(embedding).view(b, t, m.channels, m.height, m.width)

    def combine(self, summed: torch.Tensor) -> torch.Tensor:
        return self.base + summed + self.mix(summed)

    def forward(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        return self.combine(self.contributions(embedding, key_mean).sum(1))

    def empty(self, batch: int) -> torch.Tensor:
        return self.combine(torch.zeros_like(self.base)).expand(batch, -1, -1, -1)


class NoWriter(nn.Module):
    """Ablation: the episode writes nothing; M is a learned map shared by all episodes. The model is then a VAE
    whose prior is learned and conditioned on the keys: the baseline a used memory must beat."""

    def __init__(self, cfg: KanervaConfig):
        super().__init__()
        m = cfg.memory
        self.base = nn.Parameter(torch.zeros(1, m.channels, m.height, m.width))

    def contributions(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*embedding.shape[:2], *self.base.shape[1:], device=embedding.device)

    def combine(self, summed: torch.Tensor) -> torch.Tensor:
        return self.empty(summed.shape[0])

    def forward(self, embedding: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
        return self.empty(embedding.shape[0])

    def empty(self, batch: int) -> torch.Tensor:
        return self.base.expand(batch, -1, -1, -1)


def prefix_memories(writer: nn.Module, contributions: torch.Tensor) -> torch.Tensor:
    """The chain's memories [B, T, ...]: image t's is written from images 1..t-1 only (t = 1: the empty memory).
    Every writer's memory is a function of the sum of per-image writes, so these are the writer's memory of an
    exclusive cumulative sum: one pass over the episode, and image t's own write never enters its prefix (the sum
    runs over earlier images only, not a total minus t's part, so nothing of x_t survives even in rounding)."""
    b, t = contributions.shape[:2]
    summed = torch.cat([torch.zeros_like(contributions[:, :1]), contributions[:, :-1].cumsum(1)], dim=1)
    return writer.combine(summed.flatten(0, 1)).view(b, t, *summed.shape[2:])


def build_writer(cfg: KanervaConfig) -> nn.Module:
    if cfg.memory.writer == "key" and cfg.memory.content == "code":
        return CodeWriter(cfg)
    return {"key": KeyWriter, "dense": DenseWriter, "none": NoWriter}[cfg.memory.writer](cfg)
