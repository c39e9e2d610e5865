"""The loop's checkpoints and reports, off the training thread.

A report (`Session.report`: metrics, and on a checkpoint step rank 0's checkpoint folder) can take a long time: an
upload to object storage, Ray's report barrier, the wait for the Train controller's poll. `Checkpointer` runs each
report on one background thread per rank, in the order they were made, so the step loop waits only for what must
happen between two steps: on a checkpoint step, rank 0's copy of the state to host memory
(`checkpointing.snapshot`). Writing that copy (`checkpointing.write`: finiteness check, torch.save, sha256, marker)
and the report itself happen beside the next steps.

At most `max_in_flight` reports (2) wait on the thread: a new one waits for the oldest beyond that, and the
error of any finished one is raised at the next report, so a store that stays down still fails the job within
two reports. Two, not one: Ray's report waits for the controller to take the previous one (once per health-check
interval), and a checkpoint right after a metrics report then waited up to that interval (measured: 560 ms
against a 6 ms state copy). Checkpoints made faster than that fill both places; the loop then skips the next one
rather than wait (checkpoint.when_behind=skip: pipeline.train.loop), and a save that did wait says so
(`SaveTiming.room_wait_s`, its `warning`).
`drain` waits for the last one; the loop calls it before it returns. The background thread makes no
torch.distributed collective: those stay on the training thread, in the same order on every rank (a collective from
a second thread would interleave with DDP's all-reduces and hang). Ray's report synchronises the ranks through a
Ray actor, not through the process group.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import collections
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.train import checkpointing


@dataclass(frozen=True)
class Every:
    """A step schedule: due every `steps` steps (0: never) and at the job's last step."""
    steps: int

    def due(self, step: int, last: bool) -> bool:
        return last or (self.steps > 0 and step % self.steps == 0)


@dataclass
class SaveTiming:
    """Seconds the training thread spent on one checkpoint: all of it (`stall_s`), the wait for room among the
    reports in flight (`room_wait_s`: the store or Ray's controller taking reports slower than they come) and the
    state copy (`state_copy_s`); the rest of the stall is handing the copy to the thread."""
    step: int
    stall_s: float
    state_copy_s: float
    room_wait_s: float = 0.0
    warning: str = ""  # the first save of a job that waited for room says why and what to change


BACKLOG_WARN_S = 0.01  # a wait for room above this is a schedule faster than reports are taken, not jitter


class Checkpointer:
    """The loop's checkpoints: when (`due`), what a save needs first (`needs_fresh_valid`, the keep rule), the save
    and report off the training thread, and the restore at start-up. Keeping `checkpoint.keep` of them is the
    store's part (Ray's CheckpointConfig, then checkpointing.prune of what Ray never registered: pipeline.cluster.driver)."""

    def __init__(self, session, every_steps: int, background: bool = True, max_in_flight: int = 2,
                 before_checkpoint: Callable[[], Any] | None = None, keep_by: str = "recent"):
        """before_checkpoint: called on the background thread before a checkpoint is reported (rank 0's MLflow
        logger waits there until the metrics logged so far are in the store). keep_by: "valid" keeps the
        checkpoints with the best validation bound, so each must carry a bound of its own step."""
        self.session = session
        self.before_checkpoint = before_checkpoint
        self.schedule = Every(every_steps)
        self.keep_by = keep_by
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kpp-report") if background else None
        if self._pool is not None:
            # its thread now, not at the first report: a thread started by a pinned training thread would run that
            # report on the training core (pipeline.train.affinity)
            self._pool.submit(lambda: None).result()
        self._in_flight: collections.deque[Future] = collections.deque()
        self.max_in_flight = max_in_flight
        self.timings: list[SaveTiming] = []
        self._last_save_t: float | None = None
        self._warned_backlog = False

    def due(self, step: int, last: bool) -> bool:
        return self.schedule.due(step, last)

    def needs_fresh_valid(self, step: int, last: bool) -> bool:
        """Whether this step's checkpoint needs a validation bound of its own step (checkpoint.keep_by=valid)."""
        return self.keep_by == "valid" and self.due(step, last)

    def restore(self, map_location) -> dict[str, Any] | None:
        """The payload of the checkpoint to resume from (the session's: Ray's latest, or the newest complete local
        folder), loaded onto `map_location`; None when the job starts fresh."""
        with self.session.restore_dir() as folder:
            if folder is None:
                return None
            return checkpointing.load(folder, map_location=map_location)

    def report(self, metrics: dict[str, Any]) -> None:
        """A report of metrics alone (every rank calls it: a report is a barrier)."""
        self._submit(lambda: self.session.report(metrics, None, None))

    def save(self, step: int, metrics: dict[str, Any], state: Callable[[], dict[str, Any]] | None) -> SaveTiming:
        """A checkpoint report at `step`; `state` makes the snapshot (rank 0), None on the other ranks."""
        t0 = time.perf_counter()
        apart_s = None if self._last_save_t is None else t0 - self._last_save_t
        self._last_save_t = t0
        self._make_room()
        t1 = time.perf_counter()
        room_wait_s = t1 - t0
        payload = state() if state is not None else None
        copy_s = time.perf_counter() - t1
        name = checkpointing.folder_name(step)

        def write_and_report() -> None:
            if payload is None:
                self.session.report(metrics, None, name)
                return
            folder = tempfile.mkdtemp(prefix=f"kpp-{name}-")
            try:
                checkpointing.write(folder, payload)
                if self.before_checkpoint is not None:
                    self.before_checkpoint()
                self.session.report(metrics, folder, name)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self._submit(write_and_report, room=True)
        timing = SaveTiming(step, time.perf_counter() - t0, copy_s, room_wait_s)
        self.timings.append(timing)
        if room_wait_s > BACKLOG_WARN_S and not self._warned_backlog:
            self._warned_backlog = True
            timing.warning = (
                f"step {step}: the checkpoint waited {room_wait_s * 1e3:.0f} ms for {self.max_in_flight} earlier "
                f"reports (its state copy took {copy_s * 1e3:.1f} ms): checkpoints came "
                f"{'' if apart_s is None else f'{apart_s:.2f} s '}apart, faster than the store or Ray's controller "
                f"takes reports (one per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S under Ray); raise "
                f"checkpoint.every_steps (now {self.schedule.steps}) to keep the step loop from waiting")
        return timing

    def pending(self) -> int:
        """Reports handed to the thread and not finished (a metrics-only report waits while any is: StepMetrics)."""
        return sum(not f.done() for f in self._in_flight)

    def drain(self) -> None:
        """Wait for every report in flight; raise the first error."""
        while self._in_flight:
            self._in_flight.popleft().result()

    def close(self) -> None:
        """Drain, then stop the thread (also after an error: the thread never outlives the loop)."""
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _submit(self, action: Callable[[], None], room: bool = False) -> None:
        if not room:
            self._make_room()
        if self._pool is None:
            action()
            return
        self._in_flight.append(self._pool.submit(action))

    def _make_room(self) -> None:
        """Raise the error of any finished report; wait while max_in_flight are still pending."""
        while self._in_flight and (self._in_flight[0].done() or len(self._in_flight) >= self.max_in_flight):
            self._in_flight.popleft().result()
