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

Reserved cores (`scaling.training_cores`, a CPU list such as "15" or "12-15"): the training threads claim those
instead, and nothing else of ours runs there. With Ray started outside them (`taskset -c 0-11 ray start ...`), the
node's daemons, actors and new workers, which inherit the raylet's CPU mask, stay off them too: a core the training
thread shares with nothing. A worker that finds every reserved core claimed fails, naming the field.

Threads and processes started after the pin inherit the training core from the thread that started them, so
`spread` moves them off again; the loop calls it at log steps, at most once a second.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
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
    last_spread: float = field(default=-float("inf"), repr=False)  # time.monotonic() of the last walk

    def spread(self, min_interval_s: float = 0.0) -> int:
        """Move this process's other threads and its child processes' threads off the training core (those
        started since the last call inherited it). Returns how many were moved. A walk reads /proc once per
        thread: 0.45 ms with 41 threads (measured), so the loop's calls at log steps walk at most once per
        `min_interval_s` (a thread started meanwhile shares the training core until then)."""
        now = time.monotonic()
        if now - self.last_spread < min_interval_s:
            return 0
        self.last_spread = now
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


def parse_cpu_list(text: str) -> frozenset[int]:
    """A Linux CPU list as taskset -c and cpusets write it ("3", "12-15", "0,2,4-7") as a set of core numbers;
    ValueError naming the bad part."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (hi.isdigit() if sep else not hi)):
            raise ValueError(f"{part!r} is not a core number or a range a-b (a CPU list: '3', '12-15', '0,2,4-7')")
        first, last = int(lo), int(hi if sep else lo)
        if last < first:
            raise ValueError(f"{part!r}: a range a-b needs a <= b")
        cores.update(range(first, last + 1))
    return frozenset(cores)


def claim_core(allowed, keep_lowest: bool = True) -> tuple[int, IO] | None:
    """The highest core of `allowed` no other process (or other pin of this one) holds, but never the lowest
    where keep_lowest (the rest of the node runs there), with its claim file open and locked; None when none is
    free."""
    import fcntl
    os.makedirs(claims_dir(), exist_ok=True)
    cores = sorted(allowed)
    for core in (cores[1:] if keep_lowest else cores)[::-1]:
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


def pin_training_thread(reserved: frozenset[int] = frozenset()) -> CorePin | None:
    """Pin the calling (training) thread to a core it claims on this node (one of `reserved` where given, else
    one of the process's own) and spread the rest of the process over the process's other unclaimed cores. None
    (nothing pinned, said once) where none is free or the platform has no thread affinity; a RuntimeError naming
    scaling.training_cores where reserved cores were asked for and none can be had."""
    if not hasattr(os, "sched_setaffinity"):
        print("[train] scaling.pin_training_thread: this platform has no thread affinity; not pinned", flush=True)
        return None
    allowed = os.sched_getaffinity(0)
    if reserved:
        return _pin_reserved(reserved, allowed)
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


def _pin_reserved(reserved: frozenset[int], allowed: set[int]) -> CorePin:
    asked = f"scaling.training_cores={_cpu_list(reserved)}"
    got = claim_core(reserved, keep_lowest=False)
    if got is None:
        raise RuntimeError(f"{asked}: every one is claimed by another training thread on this node (claims under "
                           f"{claims_dir()}); list a core per worker the node runs")
    core, claim = got
    others = frozenset(allowed - {core} - claimed(allowed - {core}))
    if not others:
        claim.close()
        raise RuntimeError(f"{asked}: this worker may use no other core than {core} (its CPU mask: "
                           f"{_cpu_list(allowed)}), so the rest of it would have to share the training core")
    try:
        os.sched_setaffinity(0, {core})
    except OSError as e:  # a core this node does not have, or outside the container's cpuset
        claim.close()
        raise RuntimeError(f"{asked}: cannot run on core {core} here ({e.strerror}); this node has "
                           f"{os.cpu_count()} logical CPUs") from None
    pin = CorePin(core, others, frozenset(allowed), threading.get_native_id(), claim)
    pin.spread()
    return pin


def _cpu_list(cores) -> str:
    return ",".join(str(c) for c in sorted(cores))


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
