"""Episodes: which images form each episode, as int64 index arrays [E, T] into one split.

  fixed_episodes(num_images, episode_length, seed)         test/valid: the same episodes on every call, in every
                                                           process, so every evaluation sees the same episodes.
  epoch_episodes(num_images, episode_length, seed, epoch)  training: re-drawn each epoch from a fresh shuffle.
  class_episodes(labels, episode_length, seed, epoch=None)  episodes of T images of one class (episodes that share
                                                           structure, for the leave-one-out bound); epoch=None
                                                           gives the fixed evaluation episodes.

Both take a seeded permutation of all images and chunk it into episodes of T; the last num_images % T images
(different ones each epoch for training) are dropped. Randomness comes only from numpy Generators seeded by
integer tuples, never from Python's hash() or global state, so the result does not depend on PYTHONHASHSEED.
"""
from __future__ import annotations

import numpy as np

# Domain tags keep the fixed and the per-epoch streams apart even for equal seeds.
FIXED_STREAM = 0
EPOCH_STREAM = 1
CLASS_STREAM = 2


def _check(num_images: int, episode_length: int) -> None:
    if episode_length < 1:
        raise ValueError(f"episode_length must be >= 1, got {episode_length}")
    if num_images < episode_length:
        raise ValueError(f"num_images ({num_images}) is smaller than one episode (episode_length {episode_length})")


def _chunk(order: np.ndarray, episode_length: int) -> np.ndarray:
    num_episodes = order.shape[0] // episode_length
    return order[: num_episodes * episode_length].reshape(num_episodes, episode_length).astype(np.int64)


def fixed_episodes(num_images: int, episode_length: int, seed: int) -> np.ndarray:
    """int64 [num_images // episode_length, episode_length]: a seeded permutation chunked into episodes."""
    _check(num_images, episode_length)
    rng = np.random.default_rng([FIXED_STREAM, int(seed)])
    return _chunk(rng.permutation(num_images), episode_length)


def epoch_episodes(num_images: int, episode_length: int, seed: int, epoch: int) -> np.ndarray:
    """int64 [num_images // episode_length, episode_length]: training episodes of one epoch (new each epoch)."""
    _check(num_images, episode_length)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = np.random.default_rng([EPOCH_STREAM, int(seed), int(epoch)])
    return _chunk(rng.permutation(num_images), episode_length)


def class_episodes(labels: np.ndarray, episode_length: int, seed: int, epoch: int | None = None) -> np.ndarray:
    """int64 [E, episode_length]: every episode holds T images of one class. Each class's images are shuffled and
    chunked (its last n_c % T dropped), then all episodes are put in a seeded order. epoch=None: the fixed
    episodes (evaluation); an epoch number: that epoch's training episodes."""
    labels = np.asarray(labels)
    _check(labels.shape[0], episode_length)
    entropy = [CLASS_STREAM, FIXED_STREAM, int(seed)] if epoch is None else [CLASS_STREAM, EPOCH_STREAM, int(seed), int(epoch)]
    rng = np.random.default_rng(entropy)
    chunks = [_chunk(rng.permutation(np.flatnonzero(labels == c)), episode_length) for c in np.unique(labels)]
    episodes = np.concatenate(chunks)
    if episodes.shape[0] == 0:
        raise ValueError(f"no class has {episode_length} images: no class episode can be built")
    return episodes[rng.permutation(episodes.shape[0])]
