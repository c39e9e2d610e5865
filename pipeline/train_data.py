"""What the training loop reads: per-rank training batches with a resumable cursor, and fixed eval episodes.

The loop sees only `TrainStream` (batches of one epoch from a cursor) and float eval tensors, so the source can
change (in-memory splits now, the sharded WebDataset reader of pipeline/shards for object storage) without
touching the loop.

Batch order is a pure function of (seed, epoch, world size): global batch b of an epoch is episodes
[b*W*B, (b+1)*W*B) of `epoch_episodes` (of `class_episodes` for data.episodes="class": T images of one class),
and rank r takes the r-th slice of B. So every rank has the same number
of batches (the tail that does not fill a global batch is dropped: no DDP hang), no episode is seen twice in an
epoch, and the cursor (epoch, batch) is all a resume needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from kpp.data import to_model_input
from pipeline.episodes import class_episodes, epoch_episodes, fixed_episodes


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
    labels: np.ndarray | None = None  # int64 [N]: episodes of one class when given

    def __post_init__(self) -> None:
        episodes = self._episodes(0).shape[0]
        if episodes < self.batch_episodes * self.world_size:
            raise ValueError(f"data.batch_episodes: {self.batch_episodes} episodes x {self.world_size} workers need "
                             f"{self.batch_episodes * self.world_size * self.episode_length} training images, the "
                             f"split has {len(self.images)}")

    def _episodes(self, epoch: int) -> np.ndarray:
        if self.labels is None:
            return epoch_episodes(len(self.images), self.episode_length, self.seed, epoch)
        return class_episodes(self.labels, self.episode_length, self.seed, epoch)

    def batches_per_epoch(self) -> int:  # the same every epoch: class episodes per class do not depend on it
        return self._episodes(0).shape[0] // (self.batch_episodes * self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        order = self._episodes(epoch)
        b, w = self.batch_episodes, self.world_size
        for i in range(start_batch, self.batches_per_epoch()):
            first = (i * w + self.rank) * b
            keys = order[first:first + b]
            yield keys, to_model_input(self.images[keys], self.bit_depth)


def eval_episodes(images: np.ndarray, bit_depth: int, episode_length: int, count: int, seed: int,
                  labels: np.ndarray | None = None) -> torch.Tensor:
    """The first `count` fixed (seeded) episodes of a split as floats [E, T, C, H, W]: the same on every call.
    With labels, the fixed episodes of one class each."""
    idx = (fixed_episodes(len(images), episode_length, seed) if labels is None
           else class_episodes(labels, episode_length, seed))[:count]
    return to_model_input(images[idx], bit_depth)


@dataclass
class ShardStream:
    """Training batches streamed from prepared shards (pipeline.shards.reader) on any fsspec URL.

    remainder="drop": the tail that does not fill a batch on every rank is left out of the epoch, so every batch
    is full and the model's mean loss needs no padding mask; it is a different tail each epoch (seeded order)."""
    root: str
    episode_length: int
    batch_episodes: int
    seed: int
    rank: int
    world_size: int
    loader_workers: int = 0
    episodes: str = "random"

    def _config(self):
        from pipeline.shards.reader import StreamConfig
        return StreamConfig(root=self.root, split="train", episode_length=self.episode_length,
                            batch_size=self.batch_episodes, seed=self.seed, remainder="drop", as_float=True,
                            episodes=self.episodes)

    def __post_init__(self) -> None:
        from pipeline.shards.reader import Cursor, EpisodeStream
        self._batches = len(EpisodeStream(self._config(), rank=self.rank, world_size=self.world_size,
                                          cursor=Cursor(0)))
        if self._batches < 1:
            raise ValueError(f"data.batch_episodes: {self.root} has too few training images for one batch of "
                             f"{self.batch_episodes} episodes x {self.world_size} workers")

    def batches_per_epoch(self) -> int:
        return self._batches

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        from pipeline.shards.reader import Cursor, make_loader
        # spawn, not fork: a forked worker inherits fsspec's event loop and can hang on s3 (s3fs #914)
        loader = make_loader(self._config(), rank=self.rank, world_size=self.world_size,
                             cursor=Cursor(epoch, start_batch), num_workers=self.loader_workers,
                             multiprocessing_context="spawn" if self.loader_workers else None)
        for batch in loader:
            yield batch.keys.numpy(), batch.images


def shard_eval_episodes(root: str, split: str, episode_length: int, count: int, episodes: str = "random",
                        seed: int = 0) -> torch.Tensor:
    """The first `count` fixed episodes of a prepared split (stored in fixed-episode order by jobs.prepare); for
    episodes="class", the fixed class episodes (pipeline.episodes.class_episodes) of the whole split."""
    from pipeline.shards.manifest import ManifestError, read_card
    from pipeline.shards.reader import Cursor, StreamConfig, make_loader
    if episodes == "class":
        count_all = -(-int(read_card(root)["splits"][split]["num_images"]) // episode_length)
        cfg = StreamConfig(root=root, split=split, episode_length=episode_length, batch_size=count_all,
                           shuffle=False, remainder="pad", as_float=True)
        batch = next(iter(make_loader(cfg, rank=0, world_size=1, cursor=Cursor(0))))
        if batch.labels is None:
            raise ManifestError(f"{root}: data.episodes='class' needs labels, and this dataset has none")
        real = batch.mask.flatten()
        images, labels = batch.images.flatten(0, 1)[real], batch.labels.flatten()[real].numpy()
        return images[torch.from_numpy(class_episodes(labels, episode_length, seed)[:count])]
    cfg = StreamConfig(root=root, split=split, episode_length=episode_length, batch_size=count, shuffle=False,
                       remainder="pad", as_float=True)
    batch = next(iter(make_loader(cfg, rank=0, world_size=1, cursor=Cursor(0))))
    return batch.images[batch.mask.all(dim=1)]


def load_data(dataset: str, source: str, episode_length: int, batch_episodes: int, valid_episodes: int,
              test_episodes: int, seed: int, rank: int, world_size: int, shards: str = "", loader_workers: int = 0,
              episodes: str = "random"):
    """(train stream, valid episodes, test episodes, bit depth): from prepared shards when `shards` is set, else
    from a raw dataset split held in memory (pipeline.sources). episodes="class": T images of one class each, in
    training and in the fixed evaluation episodes."""
    if shards:
        from pipeline.shards.manifest import read_card
        stream = ShardStream(shards, episode_length, batch_episodes, seed, rank, world_size, loader_workers, episodes)
        return (stream, shard_eval_episodes(shards, "valid", episode_length, valid_episodes, episodes, seed),
                shard_eval_episodes(shards, "test", episode_length, test_episodes, episodes, seed),
                int(read_card(shards)["bit_depth"]))
    from pipeline.sources import load_split
    src = source or None
    train, valid, test = (load_split(dataset, src, s) for s in ("train", "valid", "test"))
    if episodes == "class" and train.labels is None:
        raise ValueError(f"data.episodes='class' needs labels, and {dataset} has none")

    def labels_of(split):
        return split.labels if episodes == "class" else None

    stream = InMemoryStream(train.images, train.bit_depth, episode_length, batch_episodes, seed, rank, world_size,
                            labels_of(train))
    return (stream, eval_episodes(valid.images, valid.bit_depth, episode_length, valid_episodes, seed, labels_of(valid)),
            eval_episodes(test.images, test.bit_depth, episode_length, test_episodes, seed, labels_of(test)),
            train.bit_depth)
