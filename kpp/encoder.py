"""f_enc: a temporal-shift (TSM) ResNet over every image of an episode, then a 2-layer MLP to E [B, T, F].

The temporal shift (Lin, Gan, Han 2019) sits on the residual branch before the block's first conv: a fraction of
the channels take the next frame's values, the same fraction the previous frame's, zero at the episode ends. The
shift runs along T only, with T segments (one segment, as in the authors' DKM code, would disable the mixing).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from kpp.config import EncoderConfig


def temporal_shift(x: torch.Tensor, episode_length: int, fraction: float, direction: str = "both") -> torch.Tensor:
    """Shift channels along the episode. x: [B*T, C, H, W] with the T images of each episode contiguous.
    direction "both": `fraction` of the channels from the next frame and as many from the previous one (TSM);
    "past": `fraction` from the previous frame only (online TSM), so frame t never sees a later frame."""
    bt, c, h, w = x.shape
    fold = int(c * fraction)
    if fold == 0:
        return x
    x = x.view(bt // episode_length, episode_length, c, h, w)
    # One cat of three channel groups (the padded shifts and the rest) instead of zero-filling a copy and writing
    # into it: about half the memory traffic, which is what this op costs on CPU.
    pad = x.new_zeros(x.shape[0], 1, fold, h, w)
    if direction == "past":
        from_prev = torch.cat([pad, x[:, :-1, :fold]], dim=1)
        return torch.cat([from_prev, x[:, :, fold:]], dim=2).view(bt, c, h, w)
    from_next = torch.cat([x[:, 1:, :fold], pad], dim=1)  # frame t sees frame t+1
    from_prev = torch.cat([pad, x[:, :-1, fold : 2 * fold]], dim=1)  # frame t sees frame t-1
    return torch.cat([from_next, from_prev, x[:, :, 2 * fold :]], dim=2).view(bt, c, h, w)


class ShiftResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, shift_fraction: float,
                 shift_direction: str = "both"):
        super().__init__()
        self.shift_fraction = shift_fraction
        self.shift_direction = shift_direction
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, episode_length: int) -> torch.Tensor:
        h = temporal_shift(x, episode_length, self.shift_fraction, self.shift_direction)
        h = self.conv1(F.relu(self.norm1(h)))
        h = self.conv2(F.relu(self.norm2(h)))
        return self.skip(x) + h


class EpisodeEncoder(nn.Module):
    """[B, T, C, H, W] -> E [B, T, F]. A stem conv (stride `stem_stride`), then three stages (width, 2*width,
    4*width), the last two downsampling by 2."""

    def __init__(self, cfg: EncoderConfig, image_channels: int, image_size: tuple[int, int]):
        super().__init__()
        self.pooling = cfg.pooling
        w = cfg.width
        self.stem = nn.Conv2d(image_channels, w, 3, cfg.stem_stride, 1, bias=False)
        blocks = []
        in_ch = w
        for stage, out_ch in enumerate((w, 2 * w, 4 * w)):
            for i in range(cfg.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ShiftResBlock(in_ch, out_ch, stride, cfg.groups, cfg.shift_fraction, cfg.shift_direction))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.GroupNorm(cfg.groups, in_ch)
        # Spatial size after the stem and the two stride-2 stages (each conv pads by 1: ceil(side / stride)).
        h, w = (math.ceil(math.ceil(math.ceil(side / cfg.stem_stride) / 2) / 2) for side in image_size)
        features = in_ch * h * w if cfg.pooling == "flatten" else in_ch
        self.head = nn.Sequential(nn.Linear(features, cfg.embedding_dim), nn.ReLU(), nn.Linear(cfg.embedding_dim, cfg.embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        h = self.stem(x.flatten(0, 1))
        for block in self.blocks:
            h = block(h, t)
        h = F.relu(self.norm(h))
        h = h.flatten(1) if self.pooling == "flatten" else h.mean(dim=(2, 3))
        return self.head(h).view(b, t, -1)
