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
