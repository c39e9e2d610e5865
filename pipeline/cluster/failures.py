"""Which training failures a retry can mend, and which it would only repeat.

Ray Train retries every worker error up to `FailureConfig.max_failures`, a bad shard or a refused resume as much
as a lost node, and has no public hook to tell them apart (Ray 2.60: the failure policy is built inside
DataParallelTrainer). So the driver retries instead (pipeline.cluster.driver.fit, with Ray's own worker retries off):
a failure whose workers raised an error of a deterministic kind ends the job at once with that error, while
crashes, lost workers and nodes, collective timeouts and storage outages are retried from the last checkpoint,
`checkpoint.max_failures` times.
"""
from __future__ import annotations



def deterministic_kinds() -> tuple[type[BaseException], ...]:
    """What the training function raises when its input is wrong (config, data plan, a corrupt or missing shard, a
    refused resume), when the model diverged past train.max_nonfinite (the seeds make a retry repeat it), or when
    the code is wrong. An OSError (storage, network) or a RuntimeError (gloo, a lost peer, CUDA) is not listed."""
    from pipeline.data.shards.fetch import ShardMissingError
    from pipeline.train.loop import NonFiniteLoss
    return (ValueError, TypeError, AttributeError, NameError, ImportError, LookupError, AssertionError,
            NotImplementedError, ShardMissingError, NonFiniteLoss)


class DeterministicFailure(RuntimeError):
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
