"""The Checkpointer: reports leave the training thread, in order, at most two pending, errors never lost."""
import threading
import time

import pytest
import torch

from pipeline.train import checkpointing
from pipeline.train.checkpointer import Checkpointer


class SlowSession:
    """Records reports (and checkpoint folders' steps) after `delay_s`, on whatever thread calls it."""

    def __init__(self, delay_s=0.0, fail_at=None):
        self.delay_s, self.fail_at = delay_s, fail_at
        self.reports, self.threads = [], set()

    def report(self, metrics, folder, name):
        time.sleep(self.delay_s)
        self.threads.add(threading.current_thread().name)
        if metrics.get("step") == self.fail_at:
            raise OSError(f"store down at step {self.fail_at}")
        step = checkpointing.load(folder)["step"] if folder else None
        self.reports.append((metrics["step"], name, step))


def _state(step):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    return lambda: checkpointing.snapshot(model=model, optimizer=opt, scheduler=None, step=step, cursor={"epoch": 0})


def test_reports_run_beside_the_training_thread_in_order():
    session = SlowSession(delay_s=0.2)
    ck = Checkpointer(session, every_steps=2)
    state = _state(2)
    state()  # first use of the optimiser's state_dict: imports, not what is measured
    t0 = time.perf_counter()
    ck.report({"step": 1})
    timing = ck.save(2, {"step": 2}, state)
    handed_over = time.perf_counter() - t0
    assert handed_over < 0.15  # neither the report nor the write waited for the 0.2 s sessions
    assert timing.stall_s >= timing.state_copy_s and timing.stall_s < 0.15
    assert timing.room_wait_s < 0.05 and timing.warning == ""  # one report in flight: room at once
    ck.close()
    assert session.reports == [(1, None, None), (2, checkpointing.folder_name(2), 2)]
    assert threading.current_thread().name not in session.threads


def test_at_most_two_reports_wait_on_the_thread():
    session = SlowSession(delay_s=0.3)
    ck = Checkpointer(session, every_steps=1)
    t0 = time.perf_counter()
    for step in (1, 2, 3):
        ck.report({"step": step})
    assert time.perf_counter() - t0 >= 0.25  # the third waited for the first
    ck.close()
    assert [r[0] for r in session.reports] == [1, 2, 3]


def test_a_checkpoint_behind_two_pending_reports_says_it_waited_for_room():
    session = SlowSession(delay_s=0.3)
    ck = Checkpointer(session, every_steps=1)
    state = _state(3)
    state()
    ck.report({"step": 1})
    ck.report({"step": 2})
    timing = ck.save(3, {"step": 3}, state)
    # the wait is told apart from the copy: a store slower than the schedule, not a slow copy
    assert timing.room_wait_s >= 0.2
    assert timing.stall_s >= timing.room_wait_s + timing.state_copy_s
    # once per job, naming the field to change
    assert "checkpoint.every_steps (now 1)" in timing.warning and "waited" in timing.warning
    ck.report({"step": 4})
    assert ck.save(5, {"step": 5}, state).warning == ""
    ck.close()
    assert [r[0] for r in session.reports] == [1, 2, 3, 4, 5]


def test_a_failed_report_is_raised_at_the_next_one_and_at_the_end():
    session = SlowSession(fail_at=2)
    ck = Checkpointer(session, every_steps=1)
    ck.report({"step": 1})
    ck.save(2, {"step": 2}, _state(2))
    time.sleep(0.2)
    with pytest.raises(OSError, match="store down at step 2"):
        ck.report({"step": 3})
    again = Checkpointer(SlowSession(fail_at=5), every_steps=1)
    again.report({"step": 5})
    with pytest.raises(OSError, match="step 5"):
        again.close()


def test_a_non_finite_state_is_refused_off_the_training_thread_and_the_error_reaches_the_loop():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    opt = torch.optim.AdamW(model.parameters())
    session = SlowSession()
    ck = Checkpointer(session, every_steps=1)
    ck.save(7, {"step": 7}, lambda: checkpointing.snapshot(model=model, optimizer=opt, scheduler=None, step=7,
                                                            cursor={}))
    with pytest.raises(checkpointing.NonFiniteState, match="step 7"):
        ck.drain()
    assert session.reports == []


def test_the_keep_rule_and_the_restore_belong_to_the_checkpointer(tmp_path):
    from pipeline.train.loop import LocalSession
    session = LocalSession(tmp_path)
    by_valid = Checkpointer(session, every_steps=5, keep_by="valid", background=False)
    by_recent = Checkpointer(session, every_steps=5, keep_by="recent", background=False)
    # a checkpoint kept by its validation bound needs one of its own step; off-schedule steps need none
    assert [s for s in range(1, 13) if by_valid.needs_fresh_valid(s, last=s == 12)] == [5, 10, 12]
    assert not any(by_recent.needs_fresh_valid(s, last=s == 12) for s in range(1, 13))
    assert by_valid.restore("cpu") is None  # nothing saved yet: a fresh start
    by_valid.save(5, {"step": 5}, _state(5))
    by_valid.save(10, {"step": 10}, _state(10))
    by_valid.close()
    payload = by_valid.restore("cpu")  # the newest complete folder, through the session
    assert payload["step"] == 10 and payload["cursor"] == {"epoch": 0}


def test_idle_keys_are_judged_from_the_end_of_the_warm_up_on():
    from pipeline.train.metrics import IdleKeys
    keys = IdleKeys(warmup_steps=4)
    keys.update(2, [9.0, 0.1], window_steps=2)  # during the warm-up key 0 is busy...
    keys.update(4, [0.2, 0.1], window_steps=2)  # ...the window reaching the warm-up's end starts the record again
    keys.update(6, [0.3, 0.9], window_steps=2)
    assert keys.max_per_key == [0.3, 0.9] and keys.at_floor(0.5) == [0]
    every_step = IdleKeys(warmup_steps=0)  # fed every step (the in-process trainer)
    for step, kl in enumerate([[0.1, 2.0], [0.4, 0.3]], start=1):
        every_step.update(step, kl)
    assert every_step.at_floor(0.5) == [0]
