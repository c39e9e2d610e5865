"""Submit one of this project's jobs to a Ray cluster's Jobs API and follow it to the end.

Everything that can be checked on the submitting machine is checked before the working dir is uploaded: the Jobs
API answers, the entrypoint is one of ours with a valid config, its storage is durable (a relative path would land
in the job's temporary working-dir copy), and a cluster without an autoscaler has the GPUs the job asks for.
Then the job is submitted with the project's runtime env (infra/runtime_env.yaml) and --working-dir, its logs are
streamed, and the job's own exit status is returned (2 for a config the job refused, as when run locally).
"""
from __future__ import annotations

import json
import pathlib
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

import yaml

from pipeline.job_env import require_durable, storage_fields
from pipeline.train import config as train_config
from pipeline.train.config import ConfigError

RUNTIME_ENV = pathlib.Path(__file__).resolve().parents[2] / "infra" / "runtime_env.yaml"


class SubmitError(Exception):
    """Bad input or an unusable cluster, found before anything was uploaded (exit 2)."""


@dataclass
class ClusterState:
    resources: dict[str, float]  # totals
    autoscales: bool


def fetch_json(url: str, timeout_s: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def cluster_state(address: str) -> ClusterState:
    """The cluster's resources and whether it autoscales, from the dashboard (what `ray status` shows)."""
    from pipeline.cluster.resources import autoscaling_node_types
    try:
        fetch_json(f"{address}/api/version", timeout_s=5)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SubmitError(f"--address: no Ray Jobs API answers at {address} ({e}); start the cluster's head with "
                          f"the dashboard (ray[default]) or pass the right http://<head>:8265") from None
    status = {}
    for _ in range(10):  # the monitor's first report can take a few seconds after the head starts
        try:
            status = fetch_json(f"{address}/api/cluster_status?format=0")["data"]["clusterStatus"] or {}
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            status = {}
        if (status.get("loadMetricsReport") or {}).get("usage"):
            break
        time.sleep(1)
    usage = (status.get("loadMetricsReport") or {}).get("usage") or {}
    mapping = (status.get("autoscalerReport") or {}).get("nodeTypeMapping") or {}
    return ClusterState(resources={k: float(v[1]) for k, v in usage.items()},
                        autoscales=autoscaling_node_types(mapping))


def check_entrypoint(cmd: list[str], cwd: pathlib.Path) -> train_config.JobConfig | None:
    """Validate a `python -m jobs.<name> ...` entrypoint as the job will see it; the training config if any."""
    if len(cmd) < 3 or not cmd[0].startswith("python") or cmd[1] != "-m" or not cmd[2].startswith("jobs."):
        raise SubmitError(f"entrypoint {shlex.join(cmd)!r}: expected `python -m jobs.<name> ...` "
                          f"(jobs.train, jobs.prepare, ...)")
    job, args = cmd[2], cmd[3:]
    if not (cwd / (job.replace(".", "/") + ".py")).is_file():
        raise SubmitError(f"entrypoint: no module {job} in the working dir {cwd}")
    from pipeline import cli
    if job == "jobs.prepare":
        try:
            ns = cli.prepare_args(args)
        except SystemExit:
            raise SubmitError(f"entrypoint: invalid arguments for jobs.prepare: {shlex.join(args)}") from None
        _durable({"--out": ns.out})
        return None
    if job in ("jobs.train", "jobs.tune"):
        ns = (cli.tune_args if job == "jobs.tune" else cli.train_args)(args)
        if ns.config and not (cwd / ns.config).is_file() and not pathlib.Path(ns.config).is_absolute():
            raise SubmitError(f"--config: {ns.config} is not in the working dir {cwd}")
        try:
            if job == "jobs.tune":  # a sweep: its training config is what the trials run
                from pipeline.tune import space
                cfg = space.load(str(cwd / ns.config) if ns.config else None, ns.overrides, root=cwd,
                                 resolve_paths=False).base
            else:
                cfg = train_config.load(str(cwd / ns.config) if ns.config else None, ns.overrides)
        except ConfigError as e:
            raise SubmitError(f"entrypoint: invalid config: {e}") from None
        fields = storage_fields(cfg)
        if not fields.get("tracking.uri"):
            fields.pop("tracking.uri", None)  # the cluster may set MLFLOW_TRACKING_URI; the job checks it there
        _durable(fields)
        return cfg
    return None


def _durable(fields: dict[str, str]) -> None:
    try:
        require_durable(fields)
    except ConfigError as e:
        raise SubmitError(str(e)) from None


def check_resources(cfg: train_config.JobConfig, state: ClusterState) -> None:
    """A cluster without an autoscaler that lacks the GPUs never gets them: refuse before uploading."""
    from pipeline.cluster.resources import may_autoscale, no_autoscaling_reason, shortfall
    if may_autoscale(cfg.scaling, lambda: state.autoscales):
        return
    gpu_missing = [m for m in shortfall(cfg.scaling, state.resources) if "GPU" in m]
    if gpu_missing:
        raise SubmitError("; ".join(gpu_missing) + f", and {no_autoscaling_reason(cfg.scaling)}")


def runtime_env(working_dir: pathlib.Path, path: pathlib.Path = RUNTIME_ENV) -> dict:
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"--runtime-env: cannot read {path} ({e})") from None
    if not isinstance(env, dict):
        raise SubmitError(f"--runtime-env: {path} must hold a mapping")
    return {**env, "working_dir": str(working_dir)}


TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def follow(client, job_id: str, poll_s: float = 2.0, out: Callable[[str], None] = sys.stdout.write):
    """Stream the job's log until it ends; return its JobDetails."""
    shown = 0
    while True:
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out(logs[shown:])
            shown = len(logs)
        if str(info.status) in TERMINAL or getattr(info.status, "value", "") in TERMINAL:
            return info
        time.sleep(poll_s)


def exit_status(info) -> int:
    status = getattr(info.status, "value", str(info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return int(code) if code not in (None, 0) else 1
