"""Which training failures a retry can mend, and which it would only repeat.

Ray Train retries every worker error up to `FailureConfig.max_failures`, a bad shard or a refused resume as much
as a lost node, and has no public hook to tell them apart (Ray 2.60: the failure policy is built inside
DataParallelTrainer). So the driver retries instead (pipeline.cluster.driver.fit, with Ray's own worker retries off):
a failure whose workers raised an error of a deterministic kind ends the job at once with that error, while
crashes, lost workers and nodes, collective timeouts and storage outages are retried from the last checkpoint,
`checkpoint.max_failures` times.

A worker group that cannot be placed (a lost node that does not come back, a request the cluster never frees) is
a failure of its own: Ray retries the placement forever by default; the driver bounds it (scaling.placement_wait_s)
and ends the job with what was asked for and what the cluster holds.
"""
from __future__ import annotations

import math
import os

# Ray Train's wait for one worker group's placement group before it counts a startup failure (Ray 2.60:
# ray.train.v2._internal.constants; Train passes the driver's value on to its controller).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_DEFAULT_S = 60.0



def deterministic_kinds() -> tuple[type[BaseException], ...]:
    """What the training function raises when its input is wrong (config, data plan, a corrupt or missing shard, a
    refused resume), when the model diverged past train.max_nonfinite (the seeds make a retry repeat it), or when
    the code is wrong. An OSError (storage, network) or a RuntimeError (gloo, a lost peer, CUDA) is not listed."""
    from pipeline.data.shards.fetch import ShardMissingError
    from pipeline.train.loop import NonFiniteLoss
    return (ValueError, TypeError, AttributeError, NameError, ImportError, LookupError, AssertionError,
            NotImplementedError, ShardMissingError, NonFiniteLoss)


class JobFailure(RuntimeError):
    """Training started and ended without a result, for a reason stated in the message (no traceback needed)."""


class DeterministicFailure(JobFailure):
    """The training function raised an error that a retry would raise again; the job was not retried."""

    def __init__(self, message: str, rank: int = -1, error: BaseException | None = None):
        super().__init__(message)
        self.rank, self.error = rank, error

    def __reduce__(self):
        return (DeterministicFailure, (str(self), self.rank, self.error))


def _died(error: BaseException) -> bool:
    """A worker process that died (killed, OOM, its node lost): whatever the others raised after it is collateral."""
    from ray.exceptions import RayActorError, WorkerCrashedError
    return isinstance(error, (RayActorError, WorkerCrashedError))


def deterministic(worker_failures: dict[int, BaseException]) -> DeterministicFailure | None:
    """The failure to raise without a retry, or None to retry: some rank raised an error of a deterministic kind
    and no rank died (a dead peer's survivors can fail with anything)."""
    if not worker_failures or any(_died(e) for e in worker_failures.values()):
        return None
    kinds = deterministic_kinds()
    for rank, error in sorted(worker_failures.items()):
        if isinstance(error, kinds):
            return DeterministicFailure(
                f"rank {rank} raised {type(error).__name__}: {error}\n(not retried: a retry would fail the same way; "
                "checkpoint.max_failures covers crashes, lost workers and nodes, and outages)", rank, error)
    return None


class PlacementTimeout(JobFailure):
    """The worker group could not be placed within scaling.placement_wait_s; the run's checkpoints are kept."""

    def __reduce__(self):
        return (PlacementTimeout, (str(self),))


def start_timeout_s() -> float:
    return float(os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_DEFAULT_S))


def placement_retries(wait_s: float) -> int:
    """Ray Train's controller_failure_limit for a placement wait of wait_s: each startup attempt waits
    start_timeout_s(), so wait_s is rounded up to whole attempts."""
    return max(1, math.ceil(wait_s / start_timeout_s())) - 1


def placement_timeout(scaling, nodes: list[dict]) -> PlacementTimeout:
    """The error for a group that found no place: what it asked for, what each live node holds, what to do."""
    want = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    have = "; ".join(f"{n.get('NodeManagerAddress', '?')} {n.get('NodeID', '')[:8]}: "
                     + ", ".join(f"{k} {v:g}" for k, v in sorted(n.get("Resources", {}).items())
                                 if k in ("CPU", "GPU"))
                     for n in nodes if n.get("Alive")) or "no live node"
    attempts = placement_retries(scaling.placement_wait_s) + 1
    return PlacementTimeout(
        f"scaling.placement_wait_s: the worker group ({scaling.num_workers} x {want}, "
        f"scaling.placement_strategy={scaling.placement_strategy}) found no place in {attempts} attempt(s) of "
        f"{start_timeout_s():g} s ({START_TIMEOUT_ENV}); the cluster's live nodes: {have}. A node that was lost "
        "did not come back, or the cluster never holds the request. The run's checkpoints are kept: re-run the "
        "same command once the cluster has the resources, and it resumes.")
