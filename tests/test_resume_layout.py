"""Resuming a run under another worker count or batch size (2 GPUs to 8, or back): the loop goes on with the images
its epoch still owes, image by image, never repeating one, and never hangs. Real loop, real checkpoints, gloo ranks."""
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.train import checkpointing
from pipeline.train import config
from pipeline.data.shards.plan import Cursor
from pipeline.data.train_data import InMemoryStream, load_data
from pipeline.train.loop import LocalSession, Loop
from tests.model_helpers import tiny_model_overrides

TINY = [*tiny_model_overrides(),
        "data.valid_episodes=4", "data.test_episodes=4", "eval.iwae_samples=2", "eval.every_steps=0",
        "train.warmup_steps=2", "train.log_every=5", "checkpoint.every_steps=5", "tracking.enabled=false"]


class Recording(InMemoryStream):
    """The digits stream, writing the image keys of every batch it hands out to `<record>.<rank>`."""

    record = ""

    def batches(self, cursor):
        for batch in super().batches(cursor):
            with open(f"{self.record}.{self.rank}", "a") as f:
                f.write(" ".join(map(str, batch.keys.ravel().tolist())) + "\n")
            yield batch


def run(rank: int, world: int, port: int, root: str, record: str, overrides: list[str]) -> None:
    """One rank of a job (a process of its own when world > 1)."""
    import datetime
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    cfg = config.load(None, [*TINY, *overrides])
    stream, valid, test, bits = load_data("digits", "", 4, cfg.data.batch_episodes, 4, 4, 0, rank, world)
    recording = Recording(stream.images, bits, 4, cfg.data.batch_episodes, 0, rank, world)
    recording.record = record
    Loop(cfg, LocalSession(root), data=(recording, valid, test)).run()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(world: int, root, record, *overrides: str) -> None:
    if world == 1:
        run(0, 1, 0, str(root), str(record), list(overrides))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(run, args=(world, port, str(root), str(record), list(overrides)), nprocs=world,
                       start_method="spawn", join=True)


def keys_of(record, world) -> list[np.ndarray]:
    """Per rank: the image keys of each batch, in order."""
    return [[np.array(line.split(), np.int64) for line in open(f"{record}.{r}")] for r in range(world)]


@pytest.mark.parametrize("before, after", [((1, 4), (2, 4)), ((2, 4), (1, 4)), ((1, 4), (1, 6))])
def test_resume_under_another_layout_goes_on_with_the_images_the_epoch_owes(tmp_path, before, after):
    (w0, b0), (w1, b1) = before, after
    images = len(load_data("digits", "", 4, 4, 4, 4, 0, 0, 1)[0].images)
    episodes = images // 4
    whole = load_data("digits", "", 4, 4, 4, 4, 0, 0, 1)[0]
    launch(w0, tmp_path / "ckpt", tmp_path / "head", f"data.batch_episodes={b0}", "train.max_steps=400",
           "train.halt_at_step=10")
    payload = checkpointing.load(checkpointing.latest_complete(tmp_path / "ckpt"))
    cursor = Cursor.from_dict(payload["cursor"])
    assert payload["step"] == 10 and (cursor.epoch, cursor.batches_seen, cursor.world_size) == (0, 10, w0)

    # the rest of the epoch under the new layout: episodes left, split over w1 ranks in batches of b1 (drop)
    left = episodes - 10 * w0 * b0
    rest = (left // w1) // b1
    launch(w1, tmp_path / "ckpt", tmp_path / "tail", f"data.batch_episodes={b1}", "train.max_steps=400",
           f"train.halt_at_step={10 + rest}")
    payload = checkpointing.load(checkpointing.latest_complete(tmp_path / "ckpt"))
    assert payload["step"] == 10 + rest and Cursor.from_dict(payload["cursor"]).epoch == 1  # the epoch is done

    head = keys_of(tmp_path / "head", w0)
    tail = keys_of(tmp_path / "tail", w1)
    assert all(len(r) == 10 for r in head) and all(len(r) == rest for r in tail)  # equal steps on every rank
    head_keys = np.concatenate([k for r in head for k in r])
    tail_keys = np.concatenate([k for r in tail for k in r])
    # image by image: the head is what the uninterrupted run read in its first 10 steps ...
    first_ten = np.concatenate([b.keys.ravel() for r in range(w0) for b in
                                list(InMemoryStream(whole.images, 1, 4, b0, 0, r, w0).batches(Cursor(0)))[:10]])
    np.testing.assert_array_equal(np.sort(head_keys), np.sort(first_ten))
    # ... and the resumed run never repeats an image and reads only the epoch's images
    everything = np.concatenate([head_keys, tail_keys])
    assert everything.size == np.unique(everything).size
    assert set(everything.tolist()) <= set(range(images))
    # nothing the epoch owed is lost beyond the tail that does not fill a batch on every rank (remainder "drop")
    assert (episodes - everything.size // 4) < w1 * b1 + w1


def test_a_resume_whose_epoch_rest_cannot_fill_one_batch_goes_on_to_the_next_epoch(tmp_path):
    """10 steps of 4 episodes leave 309 of the epoch's 349; resumed with batches of 310 the rest of epoch 0 gives
    no batch at all. The loop must go on with epoch 1 (one batch per epoch), not ask epoch 0 again forever."""
    import multiprocessing
    launch(1, tmp_path / "ckpt", tmp_path / "head", "data.batch_episodes=4", "train.max_steps=400",
           "train.halt_at_step=10")
    ctx = multiprocessing.get_context("spawn")
    resumed = ctx.Process(target=run, args=(0, 1, 0, str(tmp_path / "ckpt"), str(tmp_path / "tail"),
                                            ["data.batch_episodes=310", "train.max_steps=400", "train.halt_at_step=12",
                                             "checkpoint.every_steps=1"]))
    resumed.start()
    resumed.join(timeout=240)
    if resumed.is_alive():
        resumed.kill()
        pytest.fail("the resumed run made no step in 240 s: it kept asking the spent epoch for a batch")
    assert resumed.exitcode == 0
    payload = checkpointing.load(checkpointing.latest_complete(tmp_path / "ckpt"))
    cursor = Cursor.from_dict(payload["cursor"])
    assert payload["step"] == 12 and cursor.epoch == 3  # epochs 1 and 2 gave one batch each
    (tail,) = keys_of(tmp_path / "tail", 1)
    assert len(tail) == 2 and all(len(k) == 310 * 4 for k in tail)
