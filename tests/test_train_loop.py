"""The training loop in one process (no Ray): NaN/inf handling, what reaches a checkpoint, the bounds it reports."""
import json
import math
import pathlib
import tempfile

import pytest
import torch

from pipeline.train import checkpointing
from pipeline.train import config
from pipeline.data.train_data import InMemoryStream, load_data
from pipeline.train.loop import LocalSession, Loop, NonFiniteLoss
from tests.model_helpers import tiny_model_overrides

TINY = [*tiny_model_overrides(),
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

    def batches(self, cursor):
        for batch in super().batches(cursor):
            if batch.after.batches_seen - 1 in self.poison:
                batch.images = batch.images.clone()
                batch.images[0, 0, 0, 0, 0] = float("nan")
            yield batch


def _loop(tmp_path, poison, *overrides):
    cfg = config.load(None, [*TINY, *overrides])
    mcfg = cfg.model
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


class SpacedSession(LocalSession):
    """A local session that, like Ray's, drops metrics-only reports closer together than `min_report_interval_s`."""

    def __init__(self, root, interval):
        super().__init__(root)
        self.min_report_interval_s = interval


def _steps_reported(tmp_path, interval):
    cfg = config.load(None, [*TINY, "train.max_steps=6"])
    mcfg = cfg.model
    data = load_data("digits", "", mcfg.episode_length, 4, 4, 4, 0, 0, 1)[:3]
    session = SpacedSession(tmp_path, interval)
    Loop(cfg, session, data=data).run()
    return [r["step"] for r in session.reports]


def test_metrics_only_reports_are_spaced_checkpoint_reports_never_dropped(tmp_path):
    assert _steps_reported(tmp_path / "a", 0.0) == [1, 2, 3, 4, 5, 6]  # log_every=1, every report kept
    assert _steps_reported(tmp_path / "b", 1e9) == [2, 4, 6]  # only the checkpoint steps (every_steps=2)


class QueuedSession(SpacedSession):
    """Like Ray's: a report waits until the controller takes the one before it. Here the first report waits until
    the loop is past step 10 (or 20 s), so it stays in flight over many log steps."""

    def __init__(self, root):
        super().__init__(root, 1e-6)  # the clock rule always passes: only the in-flight rule decides
        import threading
        self.loop = None
        self.waited_steps: list[int] = []
        self._first = threading.Event()

    def report(self, metrics, folder, name):
        import time
        if not self._first.is_set():
            self._first.set()
            t_end = time.monotonic() + 20.0
            while self.loop.step < 10 and time.monotonic() < t_end:
                time.sleep(0.01)
            self.waited_steps.append(self.loop.step)
        super().report(metrics, folder, name)


def test_no_metrics_only_report_is_made_while_one_is_in_flight(tmp_path):
    """Ray's controller takes one report per health-check interval: reports made faster queue behind it, and a
    checkpoint then waited in the training thread for room (300-900 ms stalls, measured). While the step-1 report
    is held, steps 2-9 make none: the loop trains on to step 10 instead of blocking on the third report."""
    cfg = config.load(None, [*TINY, "train.max_steps=14", "checkpoint.every_steps=0"])
    data = load_data("digits", "", 4, 4, 4, 4, 0, 0, 1)[:3]
    session = QueuedSession(tmp_path)
    loop = Loop(cfg, session, data=data)
    session.loop = loop
    loop.run()
    steps = [r["step"] for r in session.reports]
    assert session.waited_steps[0] >= 10  # the loop got past step 10 while the first report was held
    assert steps[0] == 1 and not set(steps) & set(range(2, 10)) and steps[-1] == 14


class HeldSession(SpacedSession):
    """The first report is held until the loop passes `until_step` or `hold_s` passes: a store or controller
    slower than the checkpoint schedule."""

    def __init__(self, root, until_step, hold_s):
        super().__init__(root, 1e-6)
        import threading
        self.loop, self.until_step, self.hold_s = None, until_step, hold_s
        self._first = threading.Event()

    def report(self, metrics, folder, name):
        import time
        if not self._first.is_set():
            self._first.set()
            t_end = time.monotonic() + self.hold_s
            while self.loop.step < self.until_step and time.monotonic() < t_end:
                time.sleep(0.01)
        super().report(metrics, folder, name)


def _held(tmp_path, when_behind, until_step, hold_s):
    cfg = config.load(None, [*TINY, "train.max_steps=14", "checkpoint.every_steps=2",
                             f"checkpoint.when_behind={when_behind}"])
    data = load_data("digits", "", 4, 4, 4, 4, 0, 0, 1)[:3]
    session = HeldSession(tmp_path, until_step, hold_s)
    loop = Loop(cfg, session, data=data)
    session.loop = loop
    loop.run()
    return loop, [r["step"] for r in session.reports if r.get("step") is not None], session


def test_a_checkpoint_due_while_two_reports_are_in_flight_is_skipped_not_waited_for(tmp_path, capsys):
    """checkpoint.when_behind=skip (the default): with the step-1 report held and the step-2 checkpoint behind it,
    the checkpoints due at steps 4-8 would wait for room; they are skipped and the loop trains on past step 10
    while the report is held. The last step's checkpoint is never skipped, and the job resumes from it."""
    loop, steps, session = _held(tmp_path, "skip", until_step=10, hold_s=20.0)
    assert loop.checkpoints_skipped >= 3
    assert not {4, 6, 8} & set(steps) and 14 in steps
    assert max(t.room_wait_s for t in loop.checkpointer.timings if t.step != 14) < 0.05
    assert "checkpoint skipped" in capsys.readouterr().out
    assert checkpointing.step_of(checkpointing.latest_complete(tmp_path).name) == 14


def test_with_when_behind_wait_every_checkpoint_is_kept_and_the_wait_is_measured(tmp_path):
    loop, steps, _ = _held(tmp_path, "wait", until_step=10**9, hold_s=0.5)
    assert loop.checkpoints_skipped == 0
    assert {2, 4, 6, 8, 10, 12, 14} <= set(steps)
    assert max(t.room_wait_s for t in loop.checkpointer.timings) > 0.2  # the step-4 save waited for the held one


# -- two ranks (gloo): the report decision must be the same on every rank -------------------------------------
def _rank_main(rank, world, port, root, result):
    import datetime
    import os
    import time as _time

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank left waiting at a barrier the other skipped fails after 30 s instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    cfg = config.load(None, [*TINY, "train.max_steps=12", "checkpoint.every_steps=6"])
    mcfg = cfg.model
    stream, valid, test, _ = load_data("digits", "", mcfg.episode_length, 4, 4, 4, 0, rank, world)

    class Uneven(type(stream)):
        """Rank 0 is slow on some batches, so some reports are due and some are not."""

        def batches(self, cursor):
            for batch in super().batches(cursor):
                if rank == 0 and batch.after.batches_seen % 3 == 2:
                    _time.sleep(0.4)
                yield batch

    uneven = Uneven(stream.images, stream.bit_depth, stream.episode_length, 4, 0, rank, world)
    if rank == 1:  # and rank 1's clock runs 5x fast: only rank 0's may decide
        import types

        import pipeline.train.metrics as train_metrics  # the report clock lives there
        train_metrics.time = types.SimpleNamespace(perf_counter=lambda: 5 * _time.perf_counter(),
                                                   thread_time=_time.thread_time)
    session = SpacedSession(f"{root}/rank{rank}", 0.3)
    Loop(cfg, session, data=(uneven, valid, test)).run()
    with open(f"{result}.{rank}", "w") as f:
        f.write(",".join(str(r["step"]) for r in session.reports))
    with open(f"{result}.wait.{rank}", "w") as f:  # each rank's data wait as every rank sees it
        f.write(",".join(str(sum(r.get(f"perf/data_wait_s_rank{k}", 0.0) for r in session.reports)) for k in (0, 1)))
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_agree_on_which_steps_report(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "steps"
    mp.start_processes(_rank_main, args=(2, port, str(tmp_path), str(result)), nprocs=2, start_method="spawn",
                       join=True)
    steps0, steps1 = ((tmp_path / f"steps.{r}").read_text() for r in (0, 1))
    assert steps0 == steps1  # a rank that skipped a report the other made would have hung on its barrier
    reported = [int(s) for s in steps0.split(",")]
    assert {6, 12} <= set(reported)  # checkpoint steps always report
    assert 2 <= len(set(reported) - {6, 12}) < 10  # rank 0's slow batches made some, not all, reports due
    # the time each rank waited for data, per rank, on every rank: rank 0 slept 0.4 s on 4 of its 12 batches
    waits = [[float(v) for v in (tmp_path / f"steps.wait.{r}").read_text().split(",")] for r in (0, 1)]
    assert waits[0] == waits[1] and waits[0][0] > 1.0 > waits[0][1], waits


def test_checkpoints_and_validation_follow_their_step_schedules_not_epoch_ends(tmp_path):
    """They fired at every epoch end whatever their intervals said. Epochs of 8 steps here, 20 steps in all."""
    cfg = config.load(None, [*TINY, "data.batch_episodes=40", "train.max_steps=20", "train.log_every=5",
                             "checkpoint.every_steps=0", "eval.every_steps=0", "checkpoint.keep_by=recent"])
    stream, valid, test, bits = load_data("digits", "", 4, 40, 4, 4, 0, 0, 1)
    assert stream._plan(stream.start(0), stream._episodes(0).size).num_batches == 8
    validated: list[int] = []

    class CountingLoop(Loop):
        def _validate(self):
            validated.append(self.step)
            return super()._validate()

    CountingLoop(cfg, LocalSession(tmp_path), data=(stream, valid, test)).run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == [checkpointing.folder_name(20)]
    assert validated == [0, 20]  # the step-0 baseline and the last step, not steps 8 and 16


def test_a_job_restored_from_its_last_checkpoint_reports_its_last_step_again(tmp_path):
    """Killed after the last checkpoint was stored but before its report reached the driver (a sweep driver killed
    at that moment): the rerun restores at max_steps, trains nothing, and reports the last step with its test
    bounds, so Tune and the registry see a finished run rather than an older result."""
    loop, first = _loop(tmp_path, (), "train.max_steps=4")
    loop.run()
    final = first.reports[-1]
    assert "test/neg_elbo" in final and final["step"] == 4
    again, second = _loop(tmp_path, (), "train.max_steps=4")
    last = again.run()
    assert again.step == 4 and len(second.reports) == 1
    report = second.reports[0]
    assert report["resumed_from_step"] == 4 and report["step"] == 4
    assert report["test/neg_elbo"] == final["test/neg_elbo"] and report["valid_neg_elbo"] == final["valid_neg_elbo"]
    assert last == report
    # a checkpoint written before reports were kept in it: the last step is evaluated again, to the same bound
    folder = checkpointing.latest_complete(tmp_path)
    payload = checkpointing.load(folder)
    del payload["extra"]["report"]
    checkpointing.save(folder, model=again.net, optimizer=again.opt, scheduler=again.sched, step=4,
                       cursor=payload["cursor"], extra=payload["extra"])
    old, third = _loop(tmp_path, (), "train.max_steps=4")
    old.run()
    assert len(third.reports) == 1 and third.reports[0]["step"] == 4
    assert third.reports[0]["test/neg_elbo"] == pytest.approx(final["test/neg_elbo"], rel=1e-5)


def test_the_seconds_from_the_job_start_to_the_first_step_are_reported(tmp_path):
    """started_unix (the submit time, or the driver's start) to the end of the first step, measured once: a start
    10 s back reads 10 s plus the set-up and one step; every report carries the same figure; no start, no figure."""
    import time
    cfg = config.load(None, [*TINY, "train.max_steps=3"])
    data = load_data("digits", "", 4, 4, 4, 4, 0, 0, 1)[:3]
    before = time.time()
    session = LocalSession(tmp_path / "a")
    loop = Loop(cfg, session, data=data, started_unix=before - 10.0)
    assert loop.start_to_first_step_s is None
    loop.run()
    took = time.time() - before
    assert 10.0 < loop.start_to_first_step_s < 10.0 + took
    figures = {r["perf/start_to_first_step_s"] for r in session.reports}
    assert figures == {loop.start_to_first_step_s} and len(session.reports) == 3
    plain = LocalSession(tmp_path / "b")
    Loop(cfg, plain, data=data).run()
    assert all("perf/start_to_first_step_s" not in r for r in plain.reports)



class SlowStream(InMemoryStream):
    """The digits stream, each batch handed over after `delay_s` asleep (a loader that cannot keep up)."""

    delay_s = 0.03

    def batches(self, cursor):
        import time
        for batch in super().batches(cursor):
            time.sleep(self.delay_s)
            yield batch


def test_the_window_splits_into_data_wait_step_and_the_loops_own_time(tmp_path):
    """perf/step_host_s is the time inside train_step only: with a loader that sleeps 30 ms per batch, the
    data wait takes that share of the window, the step the rest less the loop's bookkeeping, and the sleep is a
    context switch of the training thread per step."""
    cfg = config.load(None, [*TINY, "train.max_steps=6", "train.log_every=3", "checkpoint.every_steps=100",
                             "eval.every_steps=100"])
    stream, valid, test, bits = load_data("digits", "", cfg.model.episode_length, 4, 4, 4, 0, 0, 1)
    slow = SlowStream(stream.images, bits, cfg.model.episode_length, 4, 0, 0, 1)
    session = LocalSession(tmp_path)
    Loop(cfg, session, data=(slow, valid, test)).run()
    windows = [r for r in session.reports if r["step"] in (3, 6)]
    assert len(windows) == 2
    for m in windows:
        assert 0.03 * 3 <= m["perf/data_wait_s"] < 0.03 * 3 + 0.5
        assert 0 < m["perf/step_host_s"] and 0 < m["perf/step_host_share"]
        assert m["perf/data_wait_share"] + m["perf/step_host_share"] <= 1.0 + 1e-9
        # window seconds = steps / (episodes/s / episodes per step); the step's time is a part of them
        window_s = 3 * 4 / m["perf/episodes_per_s"]
        assert m["perf/step_host_s"] * 3 == pytest.approx(m["perf/step_host_share"] * window_s, rel=1e-6)
        assert m["perf/context_switches_per_step"] >= 1.0  # each sleep gives the core away once


def test_the_step_clips_the_models_whole_gradient_norm():
    """train_step lists the parameters from the optimiser's groups, not the module tree: the norm it reports and
    clips to is still the whole model's."""
    from kpp.model import KanervaPlusPlus
    from pipeline.train import optim
    from pipeline.train.step import train_step
    cfg = config.load(None, [*tiny_model_overrides(), "train.warmup_steps=0", "train.lr=1e-3"])
    torch.manual_seed(0)
    model = KanervaPlusPlus(cfg.model)
    opt, sched = optim.build(model.parameters(), cfg.train)
    x = (torch.rand(2, cfg.model.episode_length, *cfg.model.image_shape) > 0.5).float()
    r = train_step(model, opt, sched, x, beta=1.0, grad_clip=1e-3, noise_seed=0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    # the gradients left by the step are the clipped ones: their norm is the clip, the reported norm is before it
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) == pytest.approx(
        1e-3, rel=1e-3)
    assert float(r.grad_norm) > 1e-2


# -- the bounds the loop reports and logs ---------------------------------------------------------------------
def test_every_report_carries_the_chain_and_the_memory_conditional_validation_bounds(tmp_path):
    """The chain bound (each image under a memory of the images before it) is what selects: reported as
    valid_chain_neg_elbo beside valid_neg_elbo (the memory-conditional bound) and kept as the best in the checkpoint;
    the final report has the three test bounds."""
    loop, session = _loop(tmp_path, (), "train.max_steps=4", "checkpoint.keep_by=valid")
    loop.run()
    assert [r["step"] for r in session.reports] == [1, 2, 3, 4]
    for r in session.reports:
        assert math.isfinite(r["valid_chain_neg_elbo"]) and math.isfinite(r["valid_neg_elbo"])
    # keep_by=valid validates at every checkpoint (steps 2, 4): reports carry the last one's bounds
    assert session.reports[0]["valid_chain_neg_elbo"] != session.reports[1]["valid_chain_neg_elbo"]
    assert session.reports[2]["valid_chain_neg_elbo"] == session.reports[1]["valid_chain_neg_elbo"]
    final = session.reports[-1]
    for key in ("test/chain_neg_elbo", "test/chain_iwae", "test/loo_neg_elbo", "test/neg_elbo", "test/iwae"):
        assert math.isfinite(final[key]), key
    # what a sweep may optimise (pipeline.tune.space refuses any other metric) is in every report
    from pipeline.tune.space import REPORTED_METRICS
    assert all(set(REPORTED_METRICS) <= set(r) for r in session.reports)
    extra = checkpointing.load(checkpointing.latest_complete(tmp_path))["extra"]
    assert extra["last_valid"] == {k: final[k] for k in ("valid_chain_neg_elbo", "valid_neg_elbo")}
    assert extra["best_valid_chain"] == min(r["valid_chain_neg_elbo"] for r in session.reports)


def test_a_checkpoint_from_before_the_chain_bound_resumes_with_it_unknown(tmp_path):
    """Its last_valid is the memory-conditional bound alone (a float): kept as valid_neg_elbo; the chain bound is
    reported as unknown (inf, the worst for the keep rule and ASHA) until the next validation gives it."""
    loop, _ = _loop(tmp_path, (), "train.max_steps=4", "train.halt_at_step=2", "eval.every_steps=0",
                    "checkpoint.keep_by=recent")
    loop.run()
    folder = checkpointing.latest_complete(tmp_path)
    payload = checkpointing.load(folder)
    e = payload["extra"]
    e["best_valid"], e["last_valid"] = 123.0, 456.0
    del e["best_valid_chain"], e["report"]
    checkpointing.save(folder, model=loop.net, optimizer=loop.opt, scheduler=loop.sched, step=2,
                       cursor=payload["cursor"], extra=e)
    again, session = _loop(tmp_path, (), "train.max_steps=4", "eval.every_steps=0", "checkpoint.keep_by=recent",
                           "checkpoint.every_steps=0")
    again.run()
    first, last = session.reports[0], session.reports[-1]
    assert first["step"] == 3 and first["valid_neg_elbo"] == 456.0 and first["valid_chain_neg_elbo"] == math.inf
    assert last["step"] == 4 and math.isfinite(last["valid_chain_neg_elbo"])  # the last step validates


def test_the_chain_bound_and_its_curve_reach_mlflow(tmp_path, mlflow_server):
    """On the session's MLflow server: valid/chain_neg_elbo at every validation beside valid/neg_elbo, the three
    test bounds as metrics, the chain curve as a table (one row per number of earlier images, logged once even when
    the last step is evaluated again) and as a labelled figure."""
    from mlflow import MlflowClient
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("loop-chain") or client.get_experiment(client.create_experiment("loop-chain"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    cfg = config.load(None, [*TINY, "train.max_steps=4", "eval.every_steps=2", "tracking.enabled=true"])
    data = load_data("digits", "", cfg.model.episode_length, 4, 4, 4, 0, 0, 1)[:3]
    loop = Loop(cfg, LocalSession(tmp_path), tracking_uri=mlflow_server, run_id=run_id, data=data)
    loop.run()
    run = client.get_run(run_id)
    for key in ("valid/chain_neg_elbo", "valid/neg_elbo"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 2, 4], key
    m = run.data.metrics
    for key in ("test/chain_neg_elbo", "test/chain_iwae", "test/loo_neg_elbo", "test/neg_elbo", "test/iwae"):
        assert math.isfinite(m[key]), key
    arts = {a.path for a in client.list_artifacts(run_id, "curves")}
    assert {"curves/chain_curve.json", "curves/chain_curve.png", "curves/loss.png"} <= arts
    t = cfg.model.episode_length

    def table():
        with tempfile.TemporaryDirectory() as d:
            return json.loads(pathlib.Path(client.download_artifacts(run_id, "curves/chain_curve.json", d)).read_text())
    logged = table()
    assert logged["columns"] == ["step", "earlier_images", "chain_neg_elbo", "chain_iwae"]
    assert [row[:2] for row in logged["data"]] == [[4, n] for n in range(t)]
    # the mean of the curve over n is the bound itself: every episode has one image with n earlier ones
    assert sum(row[2] for row in logged["data"]) / t == pytest.approx(m["test/chain_neg_elbo"], rel=1e-5)
    assert "curves/chain_curve.json" in client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]  # a table
    # the last step evaluated again (its checkpoint kept no report: _report_again) logs no second copy of its rows
    folder = checkpointing.latest_complete(tmp_path)
    payload = checkpointing.load(folder)
    del payload["extra"]["report"]
    checkpointing.save(folder, model=loop.net, optimizer=loop.opt, scheduler=loop.sched, step=4,
                       cursor=payload["cursor"], extra=payload["extra"])
    Loop(cfg, LocalSession(tmp_path), tracking_uri=mlflow_server, run_id=run_id, data=data).run()
    assert table() == logged
