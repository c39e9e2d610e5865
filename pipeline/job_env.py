"""What a driver must know when it runs as a submitted Ray job (`ray job submit`, a KubeRay RayJob).

Two facts of the Jobs API shape this module:
- The job supervisor hands the entrypoint the job's runtime env in RAY_JOB_CONFIG_JSON_ENV_VAR, and ray.init
  merges its own runtime_env into it; the same env_vars key in both is a conflict that fails the job at once.
  So the driver adds only the variables the job did not set.
- With --working-dir the entrypoint runs in a copy of the upload under the Ray session's temp folder
  (runtime_resources/working_dir_files/...), which is deleted with the session. A relative output path resolves
  into that copy and is lost silently, so a submitted job must name durable storage: a URL or an absolute path
  outside the copy.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

from pipeline.train.config import ConfigError, JobConfig

# Set by Ray's job supervisor for the entrypoint process only (ray._private.runtime_env.constants).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# jobs.submit's stamp in the job's metadata: the submitting machine's clock (time.time()) when it submitted.
SUBMITTED_AT_KEY = "kpp.submitted_unix"


def submitted_job_runtime_env() -> dict[str, Any] | None:
    """The runtime env the job was submitted with, or None when this process is not a submitted job's driver."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def job_start(fallback: tuple[float, str] | None = None) -> tuple[float, str]:
    """(unix time, what it is) the job's clock starts from, for the submit-to-first-step figure: the moment
    jobs.submit submitted it (in the job's metadata; the submitting machine's clock, so a skewed client clock
    skews the figure), else `fallback`, else the start of this process (a plain `ray job submit`, a local run)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is not None:
        try:
            return float((json.loads(raw).get("metadata") or {})[SUBMITTED_AT_KEY]), "submit"
        except (ValueError, AttributeError, KeyError, TypeError):
            pass
    return fallback or (process_start_unix(), "driver process start")


def process_start_unix() -> float:
    """When this process started (psutil, which Ray brings; else when this module was imported)."""
    try:
        import psutil
        return psutil.Process().create_time()
    except ImportError:
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def driver_env_vars(wanted: dict[str, str]) -> dict[str, str]:
    """The env_vars this driver may put in its ray.init runtime env: each wanted variable the submitted job's
    runtime env does not set already (the job's value wins; repeating a key fails ray.init). A value in this
    process's environment (a shell export, a cluster ConfigMap) overrides the default."""
    job = submitted_job_runtime_env()
    taken = set((job or {}).get("env_vars") or {})
    return {k: os.environ.get(k, v) for k, v in wanted.items() if k not in taken}


def _temporary_working_dir() -> pathlib.Path | None:
    """The uploaded working dir's copy this job runs in, if any (deleted with the Ray session)."""
    if submitted_job_runtime_env() is None:
        return None
    cwd = pathlib.Path.cwd().resolve()
    return cwd if "runtime_resources" in cwd.parts else None


def _durable(value: str, copy: pathlib.Path | None) -> bool:
    if "://" in value:
        return not value.startswith("file://") or _durable(value[len("file://"):], copy)
    path = pathlib.Path(value).expanduser()
    if not path.is_absolute():
        return False
    return copy is None or not path.resolve().is_relative_to(copy)


def storage_fields(cfg: JobConfig) -> dict[str, str]:
    """Where a training job reads and writes: {config field: path or URL} (the tracking store as its path)."""
    fields = {"checkpoint.storage_path": cfg.checkpoint.storage_path, "data.shards": cfg.data.shards,
              "data.source": cfg.data.source, "data.audit_dir": cfg.data.audit_dir}
    if cfg.tracking.enabled:
        uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        fields["tracking.uri"] = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
    return fields


def require_durable(fields: dict[str, str], copy: pathlib.Path | None = None) -> None:
    """ConfigError naming the first field whose value would vanish with a submitted job's working-dir copy."""
    if "tracking.uri" in fields and not fields["tracking.uri"]:
        raise ConfigError("tracking.uri: a submitted job has no MLFLOW_TRACKING_URI and no tracking.uri, so its "
                          "MLflow store would be written into the job's temporary working-dir copy and deleted "
                          "with it; set tracking.uri=http://<server> (or an absolute sqlite:////shared/path.db) or "
                          "MLFLOW_TRACKING_URI in the job's runtime env")
    for name, value in fields.items():
        if value and not _durable(value, copy):
            where = f" (the job runs in its temporary copy {copy})" if copy else ""
            raise ConfigError(f"{name}: {value!r} is not durable storage for a submitted job{where}: a relative "
                              f"path resolves into the uploaded working-dir copy, which Ray deletes with the "
                              f"session; use s3://bucket/prefix or an absolute path on shared storage")


def check_durable_storage(cfg: JobConfig) -> None:
    """Under a submitted job, refuse storage that would vanish with the Ray session: relative paths (they resolve
    into the uploaded working-dir copy) and absolute paths inside that copy. Outside a job nothing is checked."""
    if submitted_job_runtime_env() is not None:
        require_durable(storage_fields(cfg), _temporary_working_dir())


def check_durable_output(fields: dict[str, str]) -> None:
    """check_durable_storage for any job's outputs named by {argument: path or URL}."""
    if submitted_job_runtime_env() is not None:
        require_durable(fields, _temporary_working_dir())
