"""What the training loop reads: per-rank training batches with a resumable cursor, and fixed eval episodes.

The loop sees only `TrainStream` (batches of one epoch from a cursor) and float eval tensors, so the source can
change (in-memory splits now, the sharded WebDataset reader of pipeline/shards for object storage) without
touching the loop.

Batch order is a pure function of (seed, epoch, world size): global batch b of an epoch is episodes
[b*W*B, (b+1)*W*B) of `epoch_episodes`, and rank r takes the r-th slice of B. So every rank has the same number
of batches (the tail that does not fill a global batch is dropped: no DDP hang), no episode is seen twice in an
epoch, and the cursor (epoch, batch) is all a resume needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from kpp.data import to_model_input
from pipeline.episodes import epoch_episodes, fixed_episodes


class TrainStream(Protocol):
    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(image keys int64 [B, T], episodes float [B, T, C, H, W]) for batches start_batch.. of `epoch`."""
        ...


@dataclass
class InMemoryStream:
    images: np.ndarray  # uint8 [N, C, H, W], one split
    bit_depth: int
    episode_length: int
    batch_episodes: int
    seed: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        episodes = len(self.images) // self.episode_length
        if episodes < self.batch_episodes * self.world_size:
            raise ValueError(f"data.batch_episodes: {self.batch_episodes} episodes x {self.world_size} workers need "
                             f"{self.batch_episodes * self.world_size * self.episode_length} training images, the "
                             f"split has {len(self.images)}")

    def batches_per_epoch(self) -> int:
        return (len(self.images) // self.episode_length) // (self.batch_episodes * self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        order = epoch_episodes(len(self.images), self.episode_length, self.seed, epoch)
        b, w = self.batch_episodes, self.world_size
        for i in range(start_batch, self.batches_per_epoch()):
            first = (i * w + self.rank) * b
            keys = order[first:first + b]
            yield keys, to_model_input(self.images[keys], self.bit_depth)


def eval_episodes(images: np.ndarray, bit_depth: int, episode_length: int, count: int, seed: int) -> torch.Tensor:
    """The first `count` fixed (seeded) episodes of a split as floats [E, T, C, H, W]: the same on every call."""
    idx = fixed_episodes(len(images), episode_length, seed)[:count]
    return to_model_input(images[idx], bit_depth)


def load_data(dataset: str, source: str, episode_length: int, batch_episodes: int, valid_episodes: int,
              test_episodes: int, seed: int, rank: int, world_size: int):
    """(train stream, valid episodes, test episodes, bit depth) from a raw dataset split (pipeline.sources)."""
    from pipeline.sources import load_split
    src = source or None
    train, valid, test = (load_split(dataset, src, s) for s in ("train", "valid", "test"))
    stream = InMemoryStream(train.images, train.bit_depth, episode_length, batch_episodes, seed, rank, world_size)
    return (stream, eval_episodes(valid.images, valid.bit_depth, episode_length, valid_episodes, seed),
            eval_episodes(test.images, test.bit_depth, episode_length, test_episodes, seed), train.bit_depth)
