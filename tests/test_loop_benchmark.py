"""The loop benchmark's arithmetic and its probe (the benchmark itself is a job, not a test: research.benchmark_loop)."""
import pytest
import torch

from pipeline.data.train_data import load_data
from pipeline.train import config
from pipeline.train.loop import LocalSession, Loop
from research.benchmark_loop import nearest_batch, window_total
from research.loop_probe import PROBE_CHUNK, BracketedLoop, ProbedLoop
from tests.model_helpers import tiny_model_overrides


def test_window_means_are_summed_back_over_their_steps():
    # log steps 10, 20 and a checkpoint window ending at 25: means 1.0, 2.0 and 4.0 per step
    assert window_total({10: 1.0, 20: 2.0, 25: 4.0}) == 10 * 1.0 + 10 * 2.0 + 5 * 4.0
    assert window_total({}) == 0.0


def test_the_batch_is_sized_to_the_step_nearest_the_target():
    # the smallest size reaching 10 ms, unless the one below is nearer by ratio
    assert nearest_batch({2: 6.0, 4: 8.0, 6: 9.1, 8: 10.1}, 10.0) == 8
    assert nearest_batch({2: 6.0, 4: 9.6, 6: 11.0}, 10.0) == 4
    assert nearest_batch({2: 6.0, 4: 13.0}, 10.0) == 4  # 10/6 = 1.67 against 13/10 = 1.3
    assert nearest_batch({2: 12.0}, 10.0) == 2  # the smallest already over: it
    assert nearest_batch({2: 3.0, 4: 5.0}, 10.0) == 4  # none reaches: the largest tried


def test_the_probe_trains_the_loops_own_trajectory_in_chunks_beside_it(tmp_path):
    """The interleaved measure compares like with like: the bare model, fed the loop's batches with its seeds a
    chunk later, ends at the loop's own loss; and the probe leaves the loop's training untouched."""
    torch.set_num_threads(1)
    steps = 2 * PROBE_CHUNK
    cfg = config.load(None, [*tiny_model_overrides(), "data.batch_episodes=4", "data.valid_episodes=4",
                             "data.test_episodes=4", "eval.iwae_samples=1", f"train.max_steps={steps}",
                             "train.warmup_steps=2", f"train.log_every={PROBE_CHUNK}", "checkpoint.every_steps=0",
                             "tracking.enabled=false"])

    def data():
        return load_data("digits", "", cfg.model.episode_length, 4, 4, 4, 0, 0, 1)[:3]
    probed = ProbedLoop(cfg, LocalSession(tmp_path / "probed"), data=data())
    probed_out = probed.run()
    plain_out = Loop(cfg, LocalSession(tmp_path / "plain"), data=data()).run()
    assert probed.bare_steps == steps and len(probed.ratios) == 2 and probed.bare_wall_s > 0
    assert probed_out["train/loss"] == plain_out["train/loss"]  # the probe does not touch the loop's model
    assert float(probed.bare_loss) == pytest.approx(probed_out["train/loss"], rel=1e-6)


def test_the_bracketing_bare_loops_train_the_loops_batches_before_and_after_it(tmp_path):
    """The default measure's bare sides run in the loop's own process over the batches its stream yields: each
    ends at the loop's own last loss (the same work), and the loop itself trains as a plain one does."""
    from pipeline.data.shards.prepare import PrepareConfig, prepare
    torch.set_num_threads(1)
    shards = tmp_path / "digits"
    prepare(PrepareConfig(dataset="digits", source=None, out=str(shards), episode_length=4, shard_size=200,
                          progress=False))
    cfg = config.load(None, [*tiny_model_overrides(), f"data.shards={shards}", "data.batch_episodes=4",
                             "data.valid_episodes=4", "data.test_episodes=4", "data.loader_workers=0",
                             "eval.iwae_samples=1", "train.max_steps=12", "train.warmup_steps=2",
                             "train.log_every=4", "checkpoint.every_steps=0", "tracking.enabled=false"])
    bracketed = BracketedLoop(cfg, LocalSession(tmp_path / "bracketed"))
    out = bracketed.run()
    plain = Loop(cfg, LocalSession(tmp_path / "plain")).run()
    assert out["train/loss"] == plain["train/loss"]  # the bare loops leave the loop's training untouched
    assert [len(side["at"]) for side in bracketed.bare_sides] == [12, 12]
    for side in bracketed.bare_sides:
        assert side["final_loss"] == pytest.approx(out["train/loss"], rel=1e-6)
        assert side["loop_s"] > 0 and side["loop_cpu_s"] > 0
