"""Which images each rank and DataLoader worker delivers, as pure functions of integers.

Everything here depends only on (per-shard sample counts, seed, epoch, world_size, rank, episode_length,
batch_size, remainder policy): no clocks, no Python hash(), no process state. Every process computes the same
plan on its own, and a resume cursor needs only (epoch, batches_seen).

The epoch's sample STREAM: shards in a seeded random order (numpy default_rng([seed, epoch])), each shard's
images in its own seeded random order (default_rng([seed, epoch, shard_index])); with shuffle=False, storage
order. Cut the stream into EPISODES of T consecutive images, give each rank a contiguous run of episodes, cut
that into BATCHES of B episodes. Each rank thus reads only the shards under its run, and an episode draws its
images from one shard (rarely two), which prepare filled with a random sample of the split.

EQUAL BATCH COUNTS (no DDP hang), remainder policy:
  "pad"  (default) every sample exactly once per epoch. The last episode of the epoch may be partial and runs
         of episodes differ by at most one between ranks; every rank yields the same number of batches,
         ceil(max episodes per rank / B), and fills the missing positions with padding (mask False, key -1).
         A rank can get whole batches of padding when episodes < ranks; it still steps, so DDP never hangs.
  "drop" only full batches: every rank yields floor((episodes // world_size) / B) batches of real images, the
         rest of the epoch (fewer than world_size * B * T + T images, different ones every epoch) is not
         delivered. No padding, no mask needed; not exactly-once.
CLASS EPISODES (class_epoch_stream): the stream is re-arranged so that every T consecutive images share a class;
the rest of the plan is the same. Episodes then draw from many shards, so the reader keeps the epoch's shards.
A CHANGE OF LAYOUT mid-epoch (world size or batch size, say 2 GPUs to 8): the episodes every rank consumed under
the old layout are a pure function of (old world size, old B, batches seen), so they are left out and the rest of
the epoch's episodes, in stream order, is split again under the new layout (`episodes_left`). Nothing is repeated,
nothing the old layout would have delivered is lost; the next epoch starts fresh under the new layout. The
`Cursor` records the layouts an epoch went through, so the remap composes over any number of changes.
WORKERS: rank batch s goes to DataLoader worker (s - first) % num_workers, which is the order in which
torch's DataLoader collects from its workers, so a rank's batch order does not depend on the worker count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Remainder = Literal["pad", "drop"]
SHARD_ORDER_STREAM = 0
ROW_ORDER_STREAM = 1
CLASS_ORDER_STREAM = 2


def epoch_stream(counts: np.ndarray, seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, row within shard) of every position of the epoch's stream; int64 [sum(counts)] each."""
    counts = np.asarray(counts, dtype=np.int64)
    if not shuffle:
        order = np.arange(counts.size)
        rows = [np.arange(c) for c in counts]
    else:
        order = np.random.default_rng([SHARD_ORDER_STREAM, seed, epoch]).permutation(counts.size)
        rows = [np.random.default_rng([ROW_ORDER_STREAM, seed, epoch, int(s)]).permutation(counts[s]) for s in order]
    shard_of = np.repeat(order, counts[order])
    row_of = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return shard_of.astype(np.int64), row_of.astype(np.int64)


def class_epoch_stream(labels: list[np.ndarray], episode_length: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Like epoch_stream, for episodes of one class: every T consecutive positions share a label. Each class's
    images (over all shards) in a seeded order, cut into episodes of T (a class's last n_c % T images, other ones
    every epoch, are not delivered), the episodes of all classes in a seeded order. labels: per shard, int [count]."""
    shard_of = np.concatenate([np.full(len(l), i, np.int64) for i, l in enumerate(labels)])
    row_of = np.concatenate([np.arange(len(l), dtype=np.int64) for l in labels])
    flat = np.concatenate([np.asarray(l, np.int64) for l in labels])
    rng = np.random.default_rng([CLASS_ORDER_STREAM, seed, epoch])
    episodes = []
    for c in np.unique(flat):
        members = rng.permutation(np.flatnonzero(flat == c))
        usable = members.size - members.size % episode_length
        episodes.append(members[:usable].reshape(-1, episode_length))
    chosen = np.concatenate(episodes)
    order = chosen[rng.permutation(chosen.shape[0])].ravel()
    return shard_of[order], row_of[order]


@dataclass(frozen=True)
class RankPlan:
    num_samples: int     # images in the split
    episode_length: int  # T
    batch_size: int      # B, episodes per batch
    first_episode: int   # index (into `episodes`, or the epoch's episodes) of this rank's first episode
    num_episodes: int    # episodes this rank delivers (real ones; the rest of its batches is padding)
    num_batches: int     # batches per epoch, the same on every rank
    # The epoch's episodes still to deliver, ascending, after a change of layout (episodes_left); None = all.
    episodes: np.ndarray | None = None

    def batch_positions(self, batch_index: int) -> np.ndarray:
        """Stream positions of one batch, int64 [B, T]; -1 marks padding."""
        if not 0 <= batch_index < self.num_batches:
            raise IndexError(f"batch {batch_index} outside 0..{self.num_batches - 1}")
        local = batch_index * self.batch_size + np.arange(self.batch_size)
        real_episode = local < self.num_episodes
        index = self.first_episode + np.where(real_episode, local, 0)
        episodes = index if self.episodes is None else self.episodes[np.minimum(index, max(len(self.episodes) - 1, 0))]
        positions = episodes[:, None] * self.episode_length + np.arange(self.episode_length)[None, :]
        real = real_episode[:, None] & (positions < self.num_samples)
        return np.where(real, positions, -1)

    def taken(self, batches: int) -> np.ndarray:
        """Episode numbers of the epoch this rank delivered in its first `batches` batches."""
        index = np.arange(self.first_episode, self.first_episode + min(batches * self.batch_size, self.num_episodes))
        return index if self.episodes is None else self.episodes[index]


def rank_plan(
    num_samples: int, episode_length: int, batch_size: int, world_size: int, rank: int, remainder: Remainder = "pad",
    episodes: np.ndarray | None = None,
) -> RankPlan:
    """episodes: the epoch's episodes still to deliver (episodes_left), None for all of them."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if episode_length < 1 or batch_size < 1:
        raise ValueError(f"episode_length and batch_size must be >= 1, got {episode_length}, {batch_size}")
    if remainder not in ("pad", "drop"):
        raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
    total = epoch_episode_count(num_samples, episode_length, remainder) if episodes is None else len(episodes)
    if remainder == "pad":
        base, extra = divmod(total, world_size)
        count = base + int(rank < extra)
        first = rank * base + min(rank, extra)
        num_batches = -(-(base + int(extra > 0)) // batch_size)
    else:
        base = total // world_size
        num_batches = base // batch_size
        count = num_batches * batch_size
        first = rank * base
    return RankPlan(num_samples, episode_length, batch_size, first, count, num_batches, episodes)


def epoch_episode_count(num_samples: int, episode_length: int, remainder: Remainder) -> int:
    """Episodes an epoch's stream is cut into: a partial last one only under "pad"."""
    return -(-num_samples // episode_length) if remainder == "pad" else num_samples // episode_length


@dataclass(frozen=True)
class Layout:
    """How the epoch's episodes were split across ranks for a while: world size, episodes per batch, and the
    batches every rank consumed under it."""
    world_size: int
    batch_size: int
    batches: int


def episodes_left(num_samples: int, episode_length: int, remainder: Remainder, earlier: Sequence[Layout]) -> np.ndarray:
    """The epoch's episodes (ascending numbers) that no rank consumed under the `earlier` layouts, in order."""
    left = np.arange(epoch_episode_count(num_samples, episode_length, remainder), dtype=np.int64)
    for layout in earlier:
        taken = [rank_plan(num_samples, episode_length, layout.batch_size, layout.world_size, r, remainder,
                           episodes=left).taken(layout.batches) for r in range(layout.world_size)]
        left = np.setdiff1d(left, np.concatenate(taken), assume_unique=True)
    return left


@dataclass(frozen=True)
class Cursor:
    """Where a rank is in the data: the epoch and how many batches it has consumed in it under the current layout.

    `plan` fingerprints what the order depends on besides the epoch and the layout (shard counts, split, T, seed,
    shuffle, remainder, episode mode): resuming under another one would repeat or skip images, so it is refused.
    `world_size` and `batch_size` name the layout `batches_seen` counts in; resuming under another layout remaps
    (see the module doc), and `earlier` keeps the layouts this epoch went through before. A hand-made
    Cursor(epoch, n) without a plan is taken as is."""

    epoch: int
    batches_seen: int = 0
    plan: str | None = None
    world_size: int | None = None
    batch_size: int | None = None
    earlier: tuple[Layout, ...] = ()

    def under(self, world_size: int, batch_size: int) -> "Cursor":
        """This position expressed in the layout (world_size, batch_size): the same cursor, or a remapped one."""
        if self.world_size is None or (self.world_size, self.batch_size) == (world_size, batch_size):
            return self
        earlier = self.earlier
        if self.batches_seen:
            earlier = earlier + (Layout(self.world_size, int(self.batch_size), self.batches_seen),)
        return Cursor(self.epoch, 0, self.plan, world_size, batch_size, earlier)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_seen": self.batches_seen, "plan": self.plan,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "earlier": [[l.world_size, l.batch_size, l.batches] for l in self.earlier]}

    @classmethod
    def from_dict(cls, state: dict) -> "Cursor":
        return cls(int(state["epoch"]), int(state["batches_seen"]), state.get("plan"), state.get("world_size"),
                   state.get("batch_size"), tuple(Layout(*map(int, l)) for l in state.get("earlier", ())))


def worker_batches(num_batches: int, first_batch: int, worker_id: int, num_workers: int) -> range:
    """The batch indices one DataLoader worker produces, in order, starting from `first_batch` (the resume point)."""
    return range(first_batch + worker_id, num_batches, max(num_workers, 1))
