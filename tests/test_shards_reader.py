"""The streaming reader on local shards of real binarized MNIST: exactly once, images equal to the source,
new order per epoch, exact mid-epoch resume, fixed evaluation episodes, integrity errors naming the shard."""
import shutil

import numpy as np
import pytest
import torch

from pipeline.data.episodes import fixed_episodes
from pipeline.retry import RetryPolicy
from pipeline.data.shards.fetch import ShardIntegrityError, ShardMissingError
from pipeline.data.shards.format import ShardFormatError
from pipeline.data.shards.manifest import ManifestError
from pipeline.data.shards.prepare import PrepareConfig, prepare
from pipeline.data.shards.reader import Cursor, EpisodeStream, StreamConfig, make_loader
from pipeline.data.sources import load_split

FAST_RETRY = RetryPolicy(max_attempts=2, backoff_s=0.01, backoff_max_s=0.01)


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """Binarized MNIST in 3 uneven train shards (20k, 20k, 10k); eval episodes of T=32."""
    out = tmp_path_factory.mktemp("bmnist")
    prepare(PrepareConfig(dataset="binarized_mnist", source=str(shared_data / "binarized_mnist"), out=str(out),
                          shard_size=20_000, episode_length=32, progress=False))
    return out


@pytest.fixture(scope="module")
def source_train(shared_data):
    return load_split("binarized_mnist", shared_data / "binarized_mnist", "train")


def epoch(root, rank=0, world=1, workers=0, cursor=Cursor(0), context=None, **options):
    config = StreamConfig(root=str(root), **{"episode_length": 16, "batch_size": 8, **options})
    return list(make_loader(config, rank=rank, world_size=world, cursor=cursor, num_workers=workers,
                            multiprocessing_context=context))


def test_one_epoch_delivers_each_image_once_and_as_in_the_source(prepared, source_train):
    batches = epoch(prepared, workers=0)
    assert [b.index for b in batches] == list(range(len(batches))) == list(range(391))
    keys = torch.cat([b.keys[b.mask] for b in batches]).numpy()
    assert sorted(keys) == list(range(50_000))
    for batch in batches[::50] + batches[-1:]:
        assert batch.images.shape == (8, 16, 1, 28, 28) and batch.images.dtype == torch.uint8
        real = batch.mask.numpy()
        np.testing.assert_array_equal(batch.images.numpy()[real], source_train.images[batch.keys.numpy()[real]])
        assert (batch.images.numpy()[~real] == 0).all() and (batch.keys.numpy()[~real] == -1).all()
    # 50,000 = 3125 episodes of 16: exactly 390.6 batches, so the last batch carries 5 real episodes.
    assert batches[-1].mask.sum() == 5 * 16


def test_order_is_new_each_epoch_and_repeatable(prepared):
    def order(e):
        return torch.cat([b.keys.ravel() for b in epoch(prepared, cursor=Cursor(e), batch_size=32)])

    first = order(0)
    assert torch.equal(first, order(0))
    assert not torch.equal(first, order(1))


def test_workers_do_not_change_the_order(prepared):
    plain = [b.keys for b in epoch(prepared, workers=0)]
    forked = [b.keys for b in epoch(prepared, workers=2, context="fork")]
    assert len(plain) == len(forked) and all(torch.equal(a, b) for a, b in zip(plain, forked))


@pytest.mark.parametrize("stop_after, resume_workers", [(7, 0), (200, 2), (390, 2)])
def test_mid_epoch_resume_continues_the_same_order(prepared, stop_after, resume_workers):
    full = [b.keys for b in epoch(prepared, cursor=Cursor(2))]
    head, cursor = [], None
    for batch in make_loader(StreamConfig(root=str(prepared), episode_length=16, batch_size=8), rank=0, world_size=1,
                             cursor=Cursor(2), num_workers=2, multiprocessing_context="fork"):
        head.append(batch.keys)
        cursor = batch.cursor_after()
        if len(head) == stop_after:
            break  # the run is interrupted here; the cursor is what a checkpoint keeps
    assert (cursor.epoch, cursor.batches_seen) == (2, stop_after) and Cursor.from_dict(cursor.to_dict()) == cursor
    tail = [b.keys for b in epoch(prepared, cursor=cursor, workers=resume_workers,
                                  context="fork" if resume_workers else None)]
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


def consumed(root, cursor, world, stop_after=None, **options):
    """Image keys every rank of `world` delivers from `cursor` (each rank stops after `stop_after` batches), and
    the cursor a checkpoint would keep (rank 0's: every rank has consumed the same number of batches)."""
    keys, after = [], None
    for rank in range(world):
        batches = epoch(root, rank=rank, world=world, cursor=cursor, **options)[:stop_after]
        keys += [b.keys[b.mask] for b in batches]
        after = batches[-1].cursor_after() if rank == 0 and batches else after
    return torch.cat(keys).numpy() if keys else np.zeros(0, np.int64), after


@pytest.mark.parametrize("layouts", [[(1, 8), (2, 8)], [(2, 8), (1, 8)], [(1, 8), (1, 16)], [(3, 4), (2, 8), (1, 5)]])
def test_a_resume_under_another_world_size_or_batch_size_delivers_the_rest_of_the_epoch_once(prepared, layouts):
    """Halted after 40 batches per rank, resumed under the next layout (world size, batch size), halted again...:
    the epoch still delivers every image exactly once (pad), the first part exactly as the uninterrupted run."""
    uninterrupted, _ = consumed(prepared, Cursor(3), layouts[0][0], batch_size=layouts[0][1])
    cursor, seen = Cursor(3), []
    for i, (world, batch) in enumerate(layouts):
        last = i == len(layouts) - 1
        keys, cursor = consumed(prepared, cursor, world, None if last else 40, batch_size=batch)
        seen.append(keys)
        if i == 0:  # the head is what the uninterrupted run delivered in those batches
            np.testing.assert_array_equal(np.sort(keys), np.sort(consumed(prepared, Cursor(3), world, 40,
                                                                            batch_size=batch)[0]))
    everything = np.concatenate(seen)
    assert everything.size == np.unique(everything).size == 50_000
    assert set(everything.tolist()) == set(uninterrupted.tolist())
    assert cursor.world_size == layouts[-1][0] and len(cursor.earlier) == len(layouts) - 1


def test_a_cursor_from_another_data_plan_is_refused(prepared):
    cursor = epoch(prepared, batch_size=8)[10].cursor_after()
    assert cursor.plan is not None and len(epoch(prepared, batch_size=8, cursor=cursor)) == 391 - 11
    assert Cursor.from_dict(cursor.to_dict()) == cursor
    with pytest.raises(ValueError, match="another data plan"):
        epoch(prepared, seed=1, cursor=cursor)
    with pytest.raises(ValueError, match="another data plan"):
        epoch(prepared, episode_length=8, cursor=cursor)


def test_length_and_cursor_bounds(prepared):
    config = StreamConfig(root=str(prepared), episode_length=16, batch_size=8)
    assert len(EpisodeStream(config, rank=0, world_size=1, cursor=Cursor(0, 100))) == 291
    with pytest.raises(ValueError, match="outside this epoch"):
        EpisodeStream(config, rank=0, world_size=1, cursor=Cursor(0, 392))


def test_evaluation_split_yields_the_fixed_episodes(prepared):
    batches = epoch(prepared, split="test", shuffle=False, episode_length=32, batch_size=10)
    episodes = torch.cat([b.keys for b in batches]).numpy()
    expected = fixed_episodes(10_000, 32, seed=0)
    np.testing.assert_array_equal(episodes[: len(expected)], expected)
    # The 16 leftover images form one last, half-padded episode: still every test image exactly once.
    assert sorted(episodes[episodes >= 0]) == list(range(10_000))
    assert batches[0].labels is None


def test_float_images(prepared):
    batch = epoch(prepared, as_float=True, split="valid", batch_size=2)[0]
    assert batch.images.dtype == torch.float32 and set(batch.images.unique().tolist()) <= {0.0, 1.0}


@pytest.fixture
def damaged(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    return copy


def test_truncated_shard_is_named(damaged):
    shard = damaged / "train" / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(ShardIntegrityError, match=r"shard .*train/train-00001.tar: \d+ bytes, manifest says \d+ \(truncated"):
        epoch(damaged, retry=FAST_RETRY)


def test_wrong_checksum_is_named(damaged):
    shard = damaged / "train" / "train-00002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one pixel bit inside a packed block: same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=r"shard .*train/train-00002.tar: sha256 .* \(corrupt\)"):
        epoch(damaged, retry=FAST_RETRY)
    # A size-only check cannot see a flipped pixel: that is what verify="sha256" (the default) is for.
    assert len(epoch(damaged, verify="size")) == 391


def test_skip_policy_counts_and_reports_the_skipped_shard(damaged):
    shard = damaged / "train" / "train-00000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    batches = epoch(damaged, on_corrupt="skip", retry=FAST_RETRY)
    reported = [s for b in batches for s in b.skipped_shards]
    assert len(reported) == 1 and reported[0].endswith("train/train-00000.tar")
    keys = torch.cat([b.keys[b.mask] for b in batches]).numpy()
    assert len(keys) == len(set(keys)) == 30_000  # the 20,000 images of shard 0 are missing, and only they
    assert len(batches) == 391  # same batch count: the skipped images became padding


def test_missing_shard_and_missing_manifest(damaged, tmp_path):
    (damaged / "train" / "train-00002.tar").unlink()
    with pytest.raises(ShardMissingError, match=r"train/train-00002.tar: listed in the manifest but not found"):
        epoch(damaged, retry=FAST_RETRY)
    with pytest.raises(ManifestError, match="no manifest"):
        epoch(tmp_path / "nothing-here")


def test_unknown_split_and_bad_config(prepared):
    with pytest.raises(ManifestError, match="no shards of split 'extra'"):
        epoch(prepared, split="extra")
    with pytest.raises(ValueError, match="StreamConfig.batch_size"):
        StreamConfig(root="x", batch_size=0)
    with pytest.raises(ValueError, match="StreamConfig.on_corrupt"):
        StreamConfig(root="x", on_corrupt="ignore")


def test_a_header_damaged_shard_is_a_format_error_even_with_size_checks(damaged):
    shard = damaged / "valid" / "valid-00000.tar"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=r"valid/valid-00000.tar: tar header checksum mismatch"):
        epoch(damaged, split="valid", verify="size")


def test_drop_policy_gives_full_batches_equal_on_every_rank(prepared):
    ranks = [epoch(prepared, rank=r, world=3, remainder="drop", batch_size=16, cursor=Cursor(5)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 65  # 3125 episodes // 3 ranks // 16
    assert all(bool(b.mask.all()) for r in ranks for b in r)
    keys = torch.cat([b.keys.ravel() for r in ranks for b in r]).numpy()
    assert len(keys) == len(np.unique(keys)) == 3 * 65 * 16 * 16


@pytest.fixture(scope="module")
def prepared_mnist(shared_data, tmp_path_factory):
    """MNIST (with labels) in 3 train shards, for episodes of one class."""
    out = tmp_path_factory.mktemp("mnist")
    prepare(PrepareConfig(dataset="mnist", source=str(shared_data / "mnist"), out=str(out), shard_size=20_000,
                          episode_length=16, progress=False, splits=("train", "test")))
    return out


def test_class_episodes_hold_one_class_and_never_repeat_an_image(prepared_mnist, shared_data):
    train = load_split("mnist", shared_data / "mnist", "train")
    per_class = np.bincount(train.labels)
    batches = epoch(prepared_mnist, world=2, rank=0, episodes="class", remainder="drop")
    other = epoch(prepared_mnist, world=2, rank=1, episodes="class", remainder="drop")
    assert len(batches) == len(other)  # equal batch counts: no DDP hang
    keys = torch.cat([b.keys.ravel() for b in batches + other]).numpy()
    assert len(np.unique(keys)) == keys.size  # at most once per epoch over both ranks
    usable = int((per_class - per_class % 16).sum())
    assert usable - 2 * 8 * 16 < keys.size <= usable  # only the per-class remainder and the batch tail are left
    for batch in batches[::40]:
        labels = batch.labels.numpy()
        assert (labels == labels[:, :1]).all(), "every episode holds one class"
        np.testing.assert_array_equal(labels, train.labels[batch.keys.numpy()])
        np.testing.assert_array_equal(batch.images.numpy(), train.images[batch.keys.numpy()])
    assert len({int(b.labels[0, 0]) for b in batches[:20]}) > 1  # classes interleave across the epoch
    # Resuming mid-epoch gives the batches an uninterrupted epoch would have given next.
    resumed = epoch(prepared_mnist, world=2, rank=0, episodes="class", remainder="drop", cursor=batches[9].cursor_after())
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(resumed, batches[10:]))
    # A cursor of random episodes does not resume a class-episode stream.
    random_cursor = epoch(prepared_mnist, world=2, rank=0, remainder="drop")[3].cursor_after()
    with pytest.raises(ValueError, match="another data plan"):
        epoch(prepared_mnist, world=2, rank=0, episodes="class", remainder="drop", cursor=random_cursor)


def test_class_episodes_need_labels(prepared):
    with pytest.raises(ManifestError, match="labels"):
        epoch(prepared, episodes="class")


@pytest.mark.parametrize("workers, message_images", [(0, 512), (3, 512), (0, 2560), (3, 2560)])
def test_a_continuous_loader_yields_the_epochs_one_loader_per_epoch_would(prepared, workers, message_images):
    """One DataLoader for the whole job (its workers start once): from a mid-epoch cursor, the rest of that epoch
    and then whole epochs, batch for batch what a new loader per epoch yields, whatever the worker count (3 does not
    divide the 391 batches of an epoch, so a worker's share moves at every epoch end) and however many batches go
    in one message (512 images: one; 2560: five, and 5 divides neither the 351 batches left of epoch 2 nor 391)."""
    config = StreamConfig(root=str(prepared), episode_length=16, batch_size=32, remainder="drop")
    start = Cursor(2, 40)
    per_epoch = [b for c in (start, Cursor(3), Cursor(4))
                 for b in make_loader(config, rank=1, world_size=2, cursor=c)]
    config = StreamConfig(root=str(prepared), episode_length=16, batch_size=32, remainder="drop",
                          message_images=message_images)
    loader = make_loader(config, rank=1, world_size=2, cursor=start, num_workers=workers,
                         multiprocessing_context="spawn" if workers else None, continuous=True)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == len(per_epoch):
            break
    loader.close()
    assert [(b.epoch, b.index, b.last) for b in got] == [(b.epoch, b.index, b.last) for b in per_epoch]
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.images, b.images) for a, b in zip(got, per_epoch))
    assert [b.after for b in got] == [b.after for b in per_epoch]
    assert sum(b.last for b in got) == 3 and got[-1].last


def test_the_training_stream_keeps_one_loader_across_epochs(prepared):
    """ShardStream.batches for the cursor where the live loader stands goes on with that loader; any other cursor
    (a resume) starts a new one."""
    from pipeline.data.train_data import ShardStream
    stream = ShardStream(str(prepared), 16, 256, 0, 0, 1)  # 12 batches per epoch
    first = list(stream.batches(stream.start(0)))
    loader = stream._live[1]
    second = list(stream.batches(stream.start(1)))
    assert stream._live[1] is loader and first[-1].last and second[-1].last
    assert [b.after.epoch for b in second[:-1]] == [1] * (len(second) - 1)
    fresh = ShardStream(str(prepared), 16, 256, 0, 0, 1)
    assert [b.keys.tolist() for b in fresh.batches(fresh.start(1))] == [b.keys.tolist() for b in second]
    part = list(stream.batches(second[4].after))  # not where the loader stands: a loader of its own
    assert stream._live[1] is not loader and [b.keys.tolist() for b in part] == [b.keys.tolist() for b in second[5:]]
    stream.close()
    fresh.close()
    assert stream._live is None


@pytest.mark.parametrize("workers", [0, 1])
def test_the_first_batch_waited_for_before_the_loop_is_the_first_one_trained(prepared, workers):
    """ShardStream.ready (the loop waits there for the loader's start-up, off its step clock) holds the batch it
    waited for: batches() yields it first, and the epoch is the one a fresh stream yields, batch for batch."""
    from pipeline.data.train_data import ShardStream
    stream = ShardStream(str(prepared), 16, 256, 0, 0, 1, loader_workers=workers)
    start = stream.start(0)
    stream.warm(start)
    stream.ready()
    got = [b.keys.tolist() for b in stream.batches(start)]
    fresh = ShardStream(str(prepared), 16, 256, 0, 0, 1)
    assert got == [b.keys.tolist() for b in fresh.batches(fresh.start(0))] and len(got) == 12
    stream.close()
    fresh.close()
