"""A core of its own for the training thread (`scaling.pin_training_thread`).

Why: on a node whose cores are busy, every short wakeup of another task that the scheduler puts on the training
thread's core (Ray's daemons and actors, the DataLoader workers, our own report and logging threads) preempts the
step, and a step the load balancer moves to another core comes back to cold caches. On a GPU the training thread
is the one that launches the kernels, so each preemption is a gap in the GPU's queue. Pinned, the training thread
stays on one core and every other thread of its process and of its children (DataLoader workers) is kept off it.
Other processes are not touched.

Which core: Ray places workers by counting CPUs, not by naming cores, so two jobs on one node (a sweep's trials)
cannot tell each other's cores from a rank. Each pinning process therefore claims its core on the node with an
exclusive lock on a file per core (`KPP_CORE_CLAIMS_DIR`, default <tmp>/kpp-training-cores), taking the highest
unclaimed one and never the lowest usable core (kept for everything else). The lock goes with the process: a
crashed worker frees its core. Where no core is left, or on a platform without thread affinity, nothing is pinned
and the worker says so.

Threads and processes started after the pin inherit the training core from the thread that started them, so
`spread` moves them off again; the loop calls it at every log step.
"""
from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import IO

CLAIMS_DIR_ENV = "KPP_CORE_CLAIMS_DIR"


@dataclass
class CorePin:
    core: int             # the training thread's core
    others: frozenset     # every other thread of this process and its children runs on these
    allowed: frozenset    # the process's cores before the pin
    training_tid: int
    claim: IO | None = field(default=None, repr=False)  # the open, locked claim file of `core`

    def spread(self) -> int:
        """Move this process's other threads and its child processes' threads off the training core (those
        started since the last call inherited it). Returns how many were moved. Cheap: a /proc listing and a
        syscall per thread, ~30 threads in a Ray worker."""
        return _set_all(lambda tid: None if tid == self.training_tid else self.others)

    def release(self) -> None:
        """Every thread of the process and its children back on the cores it had before (the local path runs
        the loop on the caller's main thread, which goes on to evaluate and register), and the core unclaimed."""
        _set_all(lambda tid: self.allowed)
        if self.claim is not None:
            self.claim.close()  # closing the file drops its lock
            self.claim = None


def claims_dir() -> str:
    return os.environ.get(CLAIMS_DIR_ENV) or os.path.join(tempfile.gettempdir(), "kpp-training-cores")


def claim_core(allowed: list[int]) -> tuple[int, IO] | None:
    """The highest core of `allowed` no other process (or other pin of this one) holds, but never the lowest
    (the rest of the node runs there), with its claim file open and locked; None when none is free."""
    import fcntl
    os.makedirs(claims_dir(), exist_ok=True)
    for core in sorted(allowed)[1:][::-1]:
        f = open(os.path.join(claims_dir(), f"core-{core}.lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        return core, f
    return None


def claimed(cores) -> set[int]:
    """Which of `cores` some process holds a claim on now."""
    import fcntl
    held = set()
    for core in cores:
        path = os.path.join(claims_dir(), f"core-{core}.lock")
        if not os.path.exists(path):
            continue
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.add(core)
    return held


def pin_training_thread() -> CorePin | None:
    """Pin the calling (training) thread to a core it claims on this node and spread the rest of the process over
    the process's other unclaimed cores. None (nothing pinned, said once) where none is free or the platform has
    no thread affinity."""
    if not hasattr(os, "sched_setaffinity"):
        print("[train] scaling.pin_training_thread: this platform has no thread affinity; not pinned", flush=True)
        return None
    allowed = os.sched_getaffinity(0)
    got = claim_core(list(allowed))
    if got is None:
        print(f"[train] scaling.pin_training_thread: no core to claim among the {len(allowed)} this worker may use "
              f"(the lowest is kept for the rest, the others are claimed under {claims_dir()}); not pinned",
              flush=True)
        return None
    core, claim = got
    # the other training threads' cores are off limits too; the lowest core is never claimed, so this is not empty
    others = frozenset(allowed - {core} - claimed(allowed - {core}))
    pin = CorePin(core, others, frozenset(allowed), threading.get_native_id(), claim)
    os.sched_setaffinity(0, {core})  # 0: the calling thread (Linux affinity is per thread)
    pin.spread()
    return pin


def _set_all(cores_of) -> int:
    """Set the affinity of every thread of this process and of its descendants to cores_of(tid) (None: leave
    it); returns how many changed."""
    moved = 0
    for tid in tree_threads(os.getpid()):
        cores = cores_of(tid)
        if cores is None:
            continue
        try:
            if os.sched_getaffinity(tid) != cores:
                os.sched_setaffinity(tid, cores)
                moved += 1
        except OSError:  # the thread ended meanwhile, or is not ours to move
            pass
    return moved


def tree_threads(pid: int) -> list[int]:
    """The thread ids of process `pid` and of all its descendants (a DataLoader starts its workers from the
    training thread, a server its workers from its own)."""
    out, todo = [], [pid]
    while todo:
        process = todo.pop()
        threads = _threads(process)
        out.extend(threads)
        for tid in threads:
            try:
                with open(f"/proc/{process}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []
