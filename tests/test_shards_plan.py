"""The read plan as pure functions: exactly once over ranks x workers, equal batch counts, resume, and order
fixed by integers only. Checked exhaustively over small shapes (fast: no data is read)."""
import itertools

import numpy as np
import pytest

from pipeline.data.shards.plan import Cursor, epoch_stream, episodes_left, rank_plan, worker_batches


def delivered(counts, seed, epoch, T, B, world, workers, remainder="pad", shuffle=True):
    """Per rank: the (shard, row) pairs of every real position, in the order the DataLoader would yield them."""
    shard_of, row_of = epoch_stream(np.array(counts), seed, epoch, shuffle)
    per_rank, batch_counts = [], []
    for rank in range(world):
        plan = rank_plan(sum(counts), T, B, world, rank, remainder)
        batch_counts.append(plan.num_batches)
        # DataLoader round-robin over workers == batch order; collected per worker then merged by batch index.
        by_worker = [list(worker_batches(plan.num_batches, 0, w, workers)) for w in range(workers)]
        order = sorted(itertools.chain(*by_worker))
        assert order == list(range(plan.num_batches))
        pos = np.concatenate([plan.batch_positions(b).ravel() for b in order]) if order else np.zeros(0, int)
        pos = pos[pos >= 0]
        per_rank.append(list(zip(shard_of[pos].tolist(), row_of[pos].tolist())))
    return per_rank, batch_counts


@pytest.mark.parametrize("counts", [[200, 200, 100], [7, 3, 11], [5], [100, 1, 64, 33], [1, 1, 1]])
@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 1), (4, 3), (8, 2)])
@pytest.mark.parametrize("T, B", [(1, 1), (4, 2), (16, 8)])
def test_pad_delivers_every_sample_exactly_once_with_equal_batch_counts(counts, world, workers, T, B):
    per_rank, batch_counts = delivered(counts, 7, 1, T, B, world, workers)
    everything = [pair for rank in per_rank for pair in rank]
    assert len(everything) == len(set(everything)) == sum(counts)
    assert set(everything) == {(s, r) for s, c in enumerate(counts) for r in range(c)}
    assert len(set(batch_counts)) == 1 and batch_counts[0] >= 1


def test_more_ranks_than_episodes_still_gives_every_rank_a_batch():
    per_rank, batch_counts = delivered([3], 0, 0, T=2, B=4, world=4, workers=2)
    assert batch_counts == [1, 1, 1, 1]
    assert [len(r) for r in per_rank] == [2, 1, 0, 0]  # ranks 2 and 3 step on padding only


@pytest.mark.parametrize("counts, T, B, world", [([50, 50, 23], 4, 3, 2), ([10, 9, 8], 2, 2, 3), ([1000], 32, 4, 4)])
def test_drop_gives_only_full_batches_equal_per_rank_without_duplicates(counts, T, B, world):
    per_rank, batch_counts = delivered(counts, 1, 0, T, B, world, 2, remainder="drop")
    assert len(set(batch_counts)) == 1
    assert all(len(r) == batch_counts[0] * B * T for r in per_rank)
    everything = [p for r in per_rank for p in r]
    assert len(everything) == len(set(everything)) > sum(counts) - world * B * T - T


def test_each_epoch_is_a_new_order_but_the_same_one_everywhere():
    first = epoch_stream(np.array([30, 40, 30]), seed=5, epoch=0, shuffle=True)
    again = epoch_stream(np.array([30, 40, 30]), seed=5, epoch=0, shuffle=True)
    second = epoch_stream(np.array([30, 40, 30]), seed=5, epoch=1, shuffle=True)
    np.testing.assert_array_equal(first[0], again[0]); np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], second[1])
    unshuffled = epoch_stream(np.array([2, 3]), seed=5, epoch=9, shuffle=False)
    assert unshuffled[0].tolist() == [0, 0, 1, 1, 1] and unshuffled[1].tolist() == [0, 1, 0, 1, 2]


def test_resuming_from_any_batch_continues_the_same_order():
    plan = rank_plan(1000, 8, 4, world_size=2, rank=1)
    full = [b for w in range(3) for b in worker_batches(plan.num_batches, 0, w, 3)]
    for seen in range(plan.num_batches + 1):
        resumed = sorted(b for w in range(2) for b in worker_batches(plan.num_batches, seen, w, 2))
        assert resumed == sorted(full)[seen:]


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="rank"):
        rank_plan(10, 2, 2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="remainder"):
        rank_plan(10, 2, 2, world_size=1, rank=0, remainder="wrap")
    with pytest.raises(IndexError):
        rank_plan(10, 2, 2, world_size=1, rank=0).batch_positions(3)


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 4)])
def test_each_shard_is_needed_by_one_unbroken_run_of_a_workers_batches(world, workers):
    """What lets a reader worker drop a cached shard as soon as a batch does not need it."""
    counts = np.array([500, 130, 270, 64, 400])
    shard_of, _ = epoch_stream(counts, seed=2, epoch=3, shuffle=True)
    for rank in range(world):
        plan = rank_plan(int(counts.sum()), 7, 3, world, rank)
        for worker in range(workers):
            runs: dict[int, list[int]] = {}
            for step, batch in enumerate(worker_batches(plan.num_batches, 0, worker, workers)):
                positions = plan.batch_positions(batch).ravel()
                for shard in set(shard_of[positions[positions >= 0]].tolist()):
                    runs.setdefault(shard, []).append(step)
            for steps in runs.values():
                assert steps == list(range(steps[0], steps[-1] + 1))


def _delivered_positions(num_samples, T, cursor, world, batch, remainder, stop_after=None):
    """Stream positions all ranks deliver from `cursor` under (world, batch), each stopping after `stop_after`."""
    cursor = cursor.under(world, batch)
    left = episodes_left(num_samples, T, remainder, cursor.earlier) if cursor.earlier else None
    out = []
    for rank in range(world):
        plan = rank_plan(num_samples, T, batch, world, rank, remainder, episodes=left)
        end = plan.num_batches if stop_after is None else min(plan.num_batches, cursor.batches_seen + stop_after)
        for b in range(cursor.batches_seen, end):
            pos = plan.batch_positions(b).ravel()
            out += pos[pos >= 0].tolist()
    done = min(plan.num_batches, cursor.batches_seen + stop_after) if stop_after is not None else plan.num_batches
    return out, Cursor(cursor.epoch, done, None, world, batch, cursor.earlier)


@pytest.mark.parametrize("remainder", ["pad", "drop"])
@pytest.mark.parametrize("num_samples, T", [(1000, 8), (997, 5), (64, 4), (10, 3)])
@pytest.mark.parametrize("first, second", [((1, 4), (2, 4)), ((2, 4), (1, 4)), ((3, 2), (4, 3)), ((2, 5), (2, 2)),
                                           ((8, 1), (3, 7))])
@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_a_change_of_layout_mid_epoch_never_repeats_and_under_pad_never_loses(num_samples, T, first, second,
                                                                              stop_after, remainder):
    head, cursor = _delivered_positions(num_samples, T, Cursor(0, 0, None, *first), *first, remainder, stop_after)
    middle, cursor = _delivered_positions(num_samples, T, cursor, *second, remainder, 1)
    tail, _ = _delivered_positions(num_samples, T, cursor, *first, remainder)  # and back
    everything = head + middle + tail
    assert len(everything) == len(set(everything))
    if remainder == "pad":
        assert sorted(everything) == list(range(num_samples))
    else:  # only whole episodes, and at most the tail that does not fill a batch of the last layout is left
        assert all(p < num_samples - num_samples % T for p in everything)
        assert len(everything) > num_samples - num_samples % T - first[0] * first[1] * T - T
    # the uninterrupted head is the same positions
    assert head == _delivered_positions(num_samples, T, Cursor(0, 0, None, *first), *first, remainder, stop_after)[0]
