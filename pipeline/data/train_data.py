"""What the training loop reads: per-rank training batches with a resumable cursor, and fixed eval episodes.

The loop sees only `TrainStream` (batches from a `Cursor`, each carrying the cursor after it) and float eval
tensors, so the source can change (in-memory splits, the sharded WebDataset reader of pipeline/data/shards for object
storage) without touching the loop.

Both streams split an epoch the same way (pipeline.data.shards.plan): the epoch's episodes in a seeded order (of
`epoch_episodes`, or `class_episodes` for data.episodes="class": T images of one class), each rank a contiguous
run of them, cut into batches of B; the tail that does not fill a batch on every rank is dropped (no DDP hang).
Order is a pure function of (seed, epoch, layout), and the cursor records the layout (world size, batch size), so
a resume under another layout leaves out the episodes already consumed and splits the rest anew: never a repeat
or a skip of an image the epoch still owed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from kpp.data import to_model_input
from pipeline.data.episodes import class_episodes, epoch_episodes, fixed_episodes
from pipeline.data.shards.plan import Cursor, episodes_left, rank_plan


@dataclass
class TrainBatch:
    keys: np.ndarray      # int64 [B, T]: each image's index in its split
    images: torch.Tensor  # float [B, T, C, H, W]
    after: Cursor         # where the stream stands once this batch is consumed (what a checkpoint keeps)
    last: bool            # the epoch's last batch on this rank (the same index on every rank)


class TrainStream(Protocol):
    def start(self, epoch: int) -> Cursor:
        """The cursor at the start of `epoch` under this stream's layout."""
        ...

    def batches(self, cursor: Cursor) -> Iterator[TrainBatch]:
        """The rest of the cursor's epoch; a cursor of another layout is remapped, one of another data plan
        refused (ValueError)."""
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
        fields = ["in-memory", len(self.images), self.episode_length, self.seed, self.labels is not None]
        self.fingerprint = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
        if self._plan(self.start(0), self._episodes(0).size).num_batches < 1:
            raise ValueError(f"data.batch_episodes: {self.batch_episodes} episodes x {self.world_size} workers need "
                             f"{self.batch_episodes * self.world_size * self.episode_length} training images, the "
                             f"split has {len(self.images)}")

    def _episodes(self, epoch: int) -> np.ndarray:
        if self.labels is None:
            return epoch_episodes(len(self.images), self.episode_length, self.seed, epoch)
        return class_episodes(self.labels, self.episode_length, self.seed, epoch)

    def _plan(self, cursor: Cursor, num_samples: int):
        left = episodes_left(num_samples, self.episode_length, "drop", cursor.earlier) if cursor.earlier else None
        return rank_plan(num_samples, self.episode_length, self.batch_episodes, self.world_size, self.rank, "drop",
                         episodes=left)

    def start(self, epoch: int) -> Cursor:
        return Cursor(epoch, 0, self.fingerprint, self.world_size, self.batch_episodes)

    def batches(self, cursor: Cursor) -> Iterator[TrainBatch]:
        if cursor.plan is not None and cursor.plan != self.fingerprint:
            raise ValueError(f"cursor {cursor} was made under another data plan (this one is {self.fingerprint}): "
                             "the same split, episode_length, seed and episode mode are needed to resume")
        cursor = cursor.under(self.world_size, self.batch_episodes)
        stream = self._episodes(cursor.epoch).ravel()  # image index of every position of the epoch's stream
        plan = self._plan(cursor, stream.size)
        if not 0 <= cursor.batches_seen <= plan.num_batches:
            raise ValueError(f"cursor {cursor} is outside this epoch's {plan.num_batches} batches")
        for i in range(cursor.batches_seen, plan.num_batches):
            keys = stream[plan.batch_positions(i)]
            yield TrainBatch(keys, to_model_input(self.images[keys], self.bit_depth),
                             Cursor(cursor.epoch, i + 1, self.fingerprint, self.world_size, self.batch_episodes,
                                    cursor.earlier), i + 1 == plan.num_batches)


def eval_episodes(images: np.ndarray, bit_depth: int, episode_length: int, count: int, seed: int,
                  labels: np.ndarray | None = None) -> torch.Tensor:
    """The first `count` fixed (seeded) episodes of a split as floats [E, T, C, H, W]: the same on every call.
    With labels, the fixed episodes of one class each."""
    idx = (fixed_episodes(len(images), episode_length, seed) if labels is None
           else class_episodes(labels, episode_length, seed))[:count]
    _require(count, len(idx), episode_length)
    return to_model_input(images[idx], bit_depth)


class TooFewEpisodes(ValueError):
    def __init__(self, count: int, have: int, episode_length: int) -> None:
        super().__init__(f"{count} fixed episodes of {episode_length} images asked for, and the split holds {have}")
        self.count, self.have = count, have


def _require(count: int, have: int, episode_length: int) -> None:
    """Fewer episodes than asked is an error, never a silent cap: the count asked is what gets recorded."""
    if have < count:
        raise TooFewEpisodes(count, have, episode_length)


@dataclass
class ShardStream:
    """Training batches streamed from prepared shards (pipeline.data.shards.reader) on any fsspec URL.

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
        from pipeline.data.shards.reader import StreamConfig
        return StreamConfig(root=self.root, split="train", episode_length=self.episode_length,
                            batch_size=self.batch_episodes, seed=self.seed, remainder="drop", as_float=True,
                            episodes=self.episodes)

    def __post_init__(self) -> None:
        from pipeline.data.shards.reader import EpisodeStream
        stream = EpisodeStream(self._config(), rank=self.rank, world_size=self.world_size, cursor=Cursor(0))
        self.fingerprint = stream.fingerprint
        if len(stream) < 1:
            raise ValueError(f"data.batch_episodes: {self.root} has too few training images for one batch of "
                             f"{self.batch_episodes} episodes x {self.world_size} workers")

    def start(self, epoch: int) -> Cursor:
        return Cursor(epoch, 0, self.fingerprint, self.world_size, self.batch_episodes)

    def batches(self, cursor: Cursor) -> Iterator[TrainBatch]:
        """The rest of the cursor's epoch. One continuous loader serves consecutive epochs (its DataLoader workers
        start once per job); a cursor other than where it stands (a resume, a caller that skipped ahead) gets a
        loader of its own."""
        from pipeline.data.shards.reader import make_loader
        live, self._live = getattr(self, "_live", None), None
        if live is not None and live[0] == cursor:
            loader, batches = live[1], live[2]
        else:
            if live is not None:
                live[1].close()
            loader = self._loader(cursor)
            if len(loader) == 0:  # nothing left of this epoch under this layout
                return
            batches = iter(loader)
        for batch in batches:
            following = self.start(batch.epoch + 1) if batch.last else batch.after
            self._live = (following, loader, batches)
            yield TrainBatch(batch.keys.numpy(), batch.images, batch.after, batch.last)
            if batch.last:
                return

    def warm(self, cursor: Cursor) -> None:
        """Build the loader for `cursor` and start its workers now (they spawn and prefetch while the caller does
        something else: the loop calls it before its step-0 validation); batches(cursor) then continues from it."""
        if getattr(self, "_live", None) is not None:
            return
        loader = self._loader(cursor)
        if len(loader) == 0:
            return
        loader.start()
        self._live = (cursor, loader, iter(loader))

    def ready(self) -> None:
        """Block until the warmed loader's first batch is in hand (its spawned workers import torch: ~2 s once per
        job), so the step loop's clock starts with data to train on; the batch is the first batches() yields."""
        live = getattr(self, "_live", None)
        if live is None:
            return
        first = next(live[2], None)
        if first is not None:
            self._live = (live[0], live[1], itertools.chain([first], live[2]))

    def _loader(self, cursor: Cursor):
        from pipeline.data.shards.reader import make_loader
        # spawn, not fork: a forked worker inherits fsspec's event loop and can hang on s3 (s3fs #914)
        return make_loader(self._config(), rank=self.rank, world_size=self.world_size, cursor=cursor,
                           num_workers=self.loader_workers,
                           multiprocessing_context="spawn" if self.loader_workers else None, continuous=True)

    def close(self) -> None:
        """Stop the DataLoader workers of the live loader (the loop calls it when the job ends)."""
        live, self._live = getattr(self, "_live", None), None
        if live is not None:
            live[1].close()


def shard_eval_episodes(root: str, split: str, episode_length: int, count: int, episodes: str = "random",
                        seed: int = 0) -> torch.Tensor:
    """The first `count` fixed episodes of a prepared split (stored in fixed-episode order by jobs.prepare); for
    episodes="class", the fixed class episodes (pipeline.data.episodes.class_episodes) of the whole split."""
    from pipeline.data.shards.reader import StreamConfig, make_loader
    if episodes == "class":
        return _class_eval_episodes(root, split, episode_length, count, seed)
    cfg = StreamConfig(root=root, split=split, episode_length=episode_length, batch_size=count, shuffle=False,
                       remainder="pad", as_float=True)
    batch = next(iter(make_loader(cfg, rank=0, world_size=1, cursor=Cursor(0))))
    episodes = batch.images[batch.mask.all(dim=1)]
    _require(count, episodes.shape[0], episode_length)
    return episodes


def _class_eval_episodes(root: str, split: str, episode_length: int, count: int, seed: int,
                         chunk_episodes: int = 64) -> torch.Tensor:
    """The fixed class episodes, planned from the label index (labels.parquet: the split's labels in storage
    order) and filled by streaming the split in storage order, keeping only the chosen images: memory holds
    count x T images and one chunk, never the split."""
    from pipeline.data.shards.manifest import ManifestError, read_label_index
    from pipeline.data.shards.reader import StreamConfig, make_loader
    by_shard = read_label_index(root).get(split)
    if not by_shard:
        raise ManifestError(f"{root}: data.episodes='class' needs labels, and split {split!r} has none")
    labels = np.concatenate([np.asarray(by_shard[i], np.int64) for i in sorted(by_shard)])
    chosen = class_episodes(labels, episode_length, seed)[:count]  # [E, T] positions in storage order
    _require(count, len(chosen), episode_length)
    wanted = np.unique(chosen)
    picked: dict[int, torch.Tensor] = {}
    cfg = StreamConfig(root=root, split=split, episode_length=episode_length, batch_size=chunk_episodes,
                       shuffle=False, remainder="pad", as_float=True)
    start = 0
    for batch in make_loader(cfg, rank=0, world_size=1, cursor=Cursor(0)):
        images = batch.images.flatten(0, 1)[batch.mask.flatten()]
        for position in wanted[(wanted >= start) & (wanted < start + images.shape[0])]:
            picked[int(position)] = images[int(position) - start]
        start += images.shape[0]
        if start > wanted[-1]:
            break
    if len(picked) != wanted.size:
        raise ManifestError(f"{root}: the label index of split {split!r} lists {labels.size} images, its shards "
                            f"hold {start}")
    return torch.stack([torch.stack([picked[int(p)] for p in episode]) for episode in chosen])


def load_data(dataset: str, source: str, episode_length: int, batch_episodes: int, valid_episodes: int,
              test_episodes: int, seed: int, rank: int, world_size: int, shards: str = "", loader_workers: int = 0,
              episodes: str = "random"):
    """(train stream, valid episodes, test episodes, bit depth): from prepared shards when `shards` is set, else
    from a raw dataset split held in memory (pipeline.data.sources). episodes="class": T images of one class each, in
    training and in the fixed evaluation episodes."""
    if shards:
        from pipeline.data.shards.manifest import read_card
        stream = ShardStream(shards, episode_length, batch_episodes, seed, rank, world_size, loader_workers, episodes)
        return (stream, shard_eval_episodes(shards, "valid", episode_length, valid_episodes, episodes, seed),
                shard_eval_episodes(shards, "test", episode_length, test_episodes, episodes, seed),
                read_card(shards).bit_depth)
    from pipeline.data.sources import load_split
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
