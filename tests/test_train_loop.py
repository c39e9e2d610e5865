"""The training loop in one process (no Ray): NaN/inf handling and what reaches a checkpoint."""
import math

import pytest
import torch

from pipeline import checkpointing, config
from pipeline.train_data import InMemoryStream, load_data
from pipeline.train_loop import LocalSession, Loop, NonFiniteLoss

TINY = ["model.episode_length=4", "model.encoder={width: 8, embedding_dim: 32, groups: 4}",
        "model.memory={channels: 4, height: 8, width: 8}", "model.read.window=4",
        "model.latent={dim: 8, prior_width: 16}", "model.decoder={width: 8, groups: 4}",
        "data.batch_episodes=4", "data.valid_episodes=4", "data.test_episodes=4", "eval.iwae_samples=2",
        "train.warmup_steps=2", "train.log_every=1", "checkpoint.every_steps=2", "tracking.enabled=false"]


@pytest.fixture(autouse=True)
def one_thread():
    """As in a training worker (1 intra-op thread): tiny steps are slower with 2 threads on 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PoisonedStream(InMemoryStream):
    """The real digits stream with one NaN pixel in the batches listed in `poison` (a corrupt input)."""

    poison: tuple[int, ...] = ()

    def epoch(self, epoch, start_batch=0):
        for i, (keys, x) in enumerate(super().epoch(epoch, start_batch), start=start_batch):
            if i in self.poison:
                x = x.clone()
                x[0, 0, 0, 0, 0] = float("nan")
            yield keys, x


def _loop(tmp_path, poison, *overrides):
    cfg = config.load(None, [*TINY, *overrides])
    mcfg = config.model_config(cfg)
    stream, valid, test, bits = load_data("digits", "", mcfg.episode_length, 4, 4, 4, 0, 0, 1)
    poisoned = PoisonedStream(stream.images, bits, mcfg.episode_length, 4, 0, 0, 1)
    poisoned.poison = poison
    session = LocalSession(tmp_path)
    return Loop(cfg, session, data=(poisoned, valid, test)), session


def test_nan_batch_is_skipped_counted_and_never_checkpointed(tmp_path):
    loop, session = _loop(tmp_path, (2,), "train.max_steps=6")
    loop.run()
    skipped = [r["train/nonfinite_skipped"] for r in session.reports]
    assert skipped == [0, 0, 1, 1, 1, 1]  # step 3 (batch index 2) skipped, the rest trained
    assert all(math.isfinite(r["train/loss"]) for i, r in enumerate(session.reports) if i != 2)
    payload = checkpointing.load(checkpointing.latest_complete(tmp_path))
    assert payload["step"] == 6 and payload["extra"]["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


def test_nan_with_stop_policy_names_step_and_batch(tmp_path):
    loop, _ = _loop(tmp_path, (2,), "train.max_steps=6", "train.nonfinite=stop")
    with pytest.raises(NonFiniteLoss, match=r"step 3: .*batch image keys \[\["):
        loop.run()
    assert checkpointing.latest_complete(tmp_path).name == checkpointing.folder_name(2)


def test_too_many_skips_in_a_row_stop(tmp_path):
    loop, _ = _loop(tmp_path, (1, 2, 3), "train.max_steps=8", "train.max_nonfinite=2")
    with pytest.raises(NonFiniteLoss, match="step 4: .*3 in a row"):
        loop.run()
