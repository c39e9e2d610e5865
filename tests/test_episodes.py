"""Episode index arrays: fixed ones identical everywhere, training ones new each epoch, both partitions."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.episodes import class_episodes, epoch_episodes, fixed_episodes


def test_fixed_episodes_are_a_partition_and_repeatable():
    episodes = fixed_episodes(1003, 10, seed=7)
    assert episodes.shape == (100, 10) and episodes.dtype == np.int64
    assert len(np.unique(episodes)) == 1000 and episodes.min() >= 0 and episodes.max() < 1003
    np.testing.assert_array_equal(episodes, fixed_episodes(1003, 10, seed=7))
    assert not np.array_equal(episodes, fixed_episodes(1003, 10, seed=8))
    assert not np.array_equal(np.sort(episodes, axis=None), np.arange(1000))  # shuffled, not the first 1000


def test_epoch_episodes_change_per_epoch_and_cover_the_split():
    first, second = epoch_episodes(1000, 8, seed=3, epoch=0), epoch_episodes(1000, 8, seed=3, epoch=1)
    assert first.shape == second.shape == (125, 8)
    assert sorted(first.ravel()) == sorted(second.ravel()) == list(range(1000))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, epoch_episodes(1000, 8, seed=3, epoch=0))
    # The training stream is not the fixed evaluation stream with the same seed.
    assert not np.array_equal(first, fixed_episodes(1000, 8, seed=3))


def test_episodes_do_not_depend_on_the_hash_seed():
    code = "from pipeline.data.episodes import *; print(fixed_episodes(50, 5, 1).sum(1).tolist(), epoch_episodes(50, 5, 1, 2)[0].tolist())"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": h}
        ).stdout
        for h in ("0", "1", "12345")
    }
    assert len(outputs) == 1


@pytest.mark.parametrize("num_images, length", [(10, 0), (3, 4)])
def test_bad_episode_arguments(num_images, length):
    with pytest.raises(ValueError, match="episode_length|smaller than one episode"):
        fixed_episodes(num_images, length, seed=0)
    with pytest.raises(ValueError):
        epoch_episodes(num_images, length, seed=0, epoch=0)


def test_class_episodes_hold_one_class_each_and_never_repeat_an_image():
    labels = np.random.default_rng(0).integers(0, 5, size=1000)
    fixed = class_episodes(labels, 8, seed=1)
    expected = sum(int((labels == c).sum()) // 8 for c in range(5))
    assert fixed.shape == (expected, 8) and fixed.dtype == np.int64
    assert all(len(set(labels[e])) == 1 for e in fixed)
    assert len(np.unique(fixed)) == fixed.size
    assert len(set(labels[fixed[:, 0]].tolist())) == 5  # every class has episodes
    np.testing.assert_array_equal(fixed, class_episodes(labels, 8, seed=1))
    first, second = class_episodes(labels, 8, seed=1, epoch=0), class_episodes(labels, 8, seed=1, epoch=1)
    assert not np.array_equal(first, second) and not np.array_equal(first, fixed)
    # Episodes of different classes are interleaved, not grouped by class.
    assert len(set(labels[first[:10, 0]].tolist())) > 1
    with pytest.raises(ValueError, match="no class"):
        class_episodes(np.arange(50), 8, seed=0)
