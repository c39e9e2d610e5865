"""The training loop's view of Ray Train: rank, checkpoints on the run's storage, reports; and `train_worker`,
the function TorchTrainer runs on each worker. Everything the loop needs from Ray goes through here."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from pipeline.train import checkpointing
from pipeline.train.config import JobConfig
from pipeline.train.loop import Loop


class RaySession:
    """Ray Train's view of the run. `storage` = (pyarrow filesystem, path of this run's folder) lets a restarted
    worker group find checkpoints that are complete on storage but that the Train controller never registered:
    it drains reports every health-check interval, so a crash right after an upload otherwise loses it (measured:
    restarted from step 0 with checkpoint_10 complete on disk)."""

    def __init__(self, storage=None):
        import ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.storage = storage
        # The controller takes one report per worker per health-check interval from a one-slot queue, so a report
        # sooner than that after the last one blocks the step loop until the next poll. Metrics-only reports (the
        # driver's progress line) are therefore spaced by at least one interval.
        self.min_report_interval_s = _health_check_interval_s()

    @contextlib.contextmanager
    def restore_dir(self):
        import ray.train
        ckpt = ray.train.get_checkpoint()
        with tempfile.TemporaryDirectory() as tmp:
            found, error = None, None
            if self.rank == 0 and self.storage:
                try:
                    found = checkpointing.fetch_latest_complete(*self.storage, tmp)
                except checkpointing.CheckpointStoreError as e:
                    error = e
            # every rank resumes from rank 0's choice (-2: the store did not answer, every rank fails alike)
            step = torch.tensor([-2 if error else checkpointing.step_of(found.name) if found is not None else -1])
            if dist.is_initialized():
                dist.broadcast(step, src=0)
            if step.item() == -2:
                raise error or checkpointing.CheckpointStoreError("rank 0 could not read the checkpoint store")
            if step.item() >= 0:
                if found is None:  # the other ranks fetch the folder rank 0 chose
                    found = checkpointing.download(*self.storage, checkpointing.folder_name(step.item()), tmp)
                yield str(found)
            elif ckpt is not None:
                with ckpt.as_directory() as d:
                    yield d
            else:
                yield None

    def report(self, metrics, folder, name):
        import ray.train
        from ray.train import Checkpoint
        if folder and self.storage:
            # our own upload: retried through a store outage, the completion marker last (checkpointing.upload)
            fs, _ = self.storage

            def upload(checkpoint, dir_name):
                from pipeline.cluster.retrying_fs import retrying
                # the controller later reads and deletes it through this filesystem: retried there too
                return Checkpoint(path=checkpointing.upload(checkpoint.path, fs, self.storage[1], dir_name),
                                  filesystem=retrying(fs))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name,
                             checkpoint_upload_fn=upload)
            return
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None,
                         checkpoint_dir_name=name)

    def prepare_model(self, model):
        import ray.train.torch
        return ray.train.torch.prepare_model(model)


def _health_check_interval_s() -> float:
    import os
    try:
        from ray.train.v2._internal.constants import (DEFAULT_HEALTH_CHECK_INTERVAL_S,
                                                      HEALTH_CHECK_INTERVAL_S_ENV_VAR)
    except ImportError:  # the constants are private; these are Ray 2.60's
        DEFAULT_HEALTH_CHECK_INTERVAL_S, HEALTH_CHECK_INTERVAL_S_ENV_VAR = 2.0, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    return float(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S))


def _quiet_ray_reports() -> None:
    """Ray logs every report of every rank with all its metrics at INFO (the controller's progress line says it
    once). Those loggers are private and named by file path in Ray 2.60, hence the lookup; a miss is harmless."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for module in (context, storage):
        for name in (module.__name__, module.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(loop_config: dict[str, Any], loop_class: type[Loop] = Loop) -> None:
    """Entry point of every Ray Train worker; loop_config = {"job": JobConfig dict, "tracking_uri", "run_id",
    "storage": (pyarrow filesystem, run folder), "started_unix": when the job's clock started (driver.run)}.
    loop_class: the Loop, or an instrumented subclass of it (research.loop_probe)."""
    job = JobConfig.from_dict(loop_config["job"])
    _quiet_ray_reports()
    # a worker's share of the node: more intra-op threads than its CPUs oversubscribes the cores
    torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    session = RaySession(loop_config.get("storage"))
    loop_class(job, session, loop_config.get("tracking_uri", ""), loop_config.get("run_id", ""),
               started_unix=loop_config.get("started_unix")).run()
