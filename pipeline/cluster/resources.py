"""Does the cluster hold what the worker group asks for, or will it? Checked before the worker group is requested.

A request Ray cannot place does not fail, it waits forever (stack notes §3). On a fixed cluster the driver therefore
compares the request with the cluster's resources and fails at once. On an autoscaling cluster (KubeRay with the
in-tree autoscaler, the cluster launcher) GPU workers often start at zero and appear only after demand is seen:
there the driver asks the autoscaler for the bundles (ray.autoscaler.sdk.request_resources, public) and waits,
bounded by scaling.resource_wait_s, printing what is still missing.
"""
from __future__ import annotations

import time
from typing import Callable

from pipeline.train.config import ConfigError, ScalingConfig


def shortfall(s: ScalingConfig, have: dict[str, float], nodes: list[dict[str, float]] | None = None) -> list[str]:
    """What the cluster lacks for the worker group, one line per resource (empty: it fits). nodes: each live
    node's resources, for STRICT_SPREAD (a worker per node)."""
    out = []
    if s.placement_strategy == "STRICT_SPREAD" and nodes is not None:
        one = worker_resources(s)
        hosts = sum(all(n.get(k, 0) >= v - 1e-9 for k, v in one.items()) for n in nodes)
        if hosts < s.num_workers:
            out.append(f"scaling.placement_strategy: STRICT_SPREAD puts each of the {s.num_workers} workers on a "
                       f"node of its own, and {hosts} of the cluster's {len(nodes)} live node(s) can hold one "
                       f"({one})")
    gpus = s.num_workers * s.gpus_per_worker
    if s.use_gpu and have.get("GPU", 0) < gpus - 1e-9:
        out.append(f"scaling.num_workers: {s.num_workers} workers with scaling.use_gpu=true need {gpus:g} "
                   f"GPUs, the cluster has {have.get('GPU', 0):g}")
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_cpu > have.get("CPU", 0) + 1e-9:
        out.append(f"scaling.cpus_per_worker: {s.num_workers} x {s.cpus_per_worker} CPUs requested, the cluster "
                   f"has {have.get('CPU', 0):g}")
    return out


def live_nodes() -> list[dict[str, float]]:
    """The resources of each node the cluster counts as alive."""
    import ray
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def worker_resources(s: ScalingConfig) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs and, with use_gpu, its (possibly fractional) GPUs."""
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def cluster_autoscales(report_wait_s: float = 20.0, poll_s: float = 0.5,
                       read: Callable[[], bool | None] | None = None) -> bool:
    """Whether an autoscaler with node types of its own serves this cluster (the launcher, KubeRay).

    The monitor's first report comes a few seconds after the head starts (one AUTOSCALER_UPDATE_INTERVAL_S, later on
    a busy head): a driver that starts with its cluster waits up to report_wait_s for it rather than read its absence
    as 'no autoscaler' (CI saw exactly that); a read that fails is asked again within the same bound. read: the
    monitor's answer, None before its first report (tests pass their own). If Ray's internals move (the import or
    attribute is gone), the answer is 'no' at once and the driver fails fast as on a fixed cluster."""
    read = read or monitor_reports_autoscaling
    deadline = time.monotonic() + report_wait_s
    while True:
        try:
            answer = read()
        except (ImportError, AttributeError):  # Ray's internals moved: see docstring
            return False
        except Exception:  # noqa: BLE001 - a GCS read that timed out on a busy head: ask again
            answer = None
        if answer is not None:
            return answer
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def monitor_reports_autoscaling() -> bool | None:
    """What Ray's monitor says: True for an autoscaler with node types of its own, False for none, None when it has
    not reported yet.

    Every head runs the monitor and publishes its report in the GCS key-value store, also without an autoscaling
    config; then it runs a read-only provider whose node types are the nodes themselves (node_<id>). A configured
    autoscaler names its node types (head, gpu_worker, ...). Autoscaler v2 marks itself in the store. Ray has no
    public call for this: the reads below are the ones `ray status` makes (Ray 2.60, pinned). A live cluster's report
    maps at least the head, so an empty mapping is 'not yet' too."""
    import json

    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get
    if ray.is_initialized() and is_autoscaler_v2(fetch_from_server=True):
        return True
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    mapping = ((json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}) if raw else {}
    return autoscaling_node_types(mapping) if mapping else None


def may_autoscale(s: ScalingConfig, detect: Callable[[], bool]) -> bool:
    """Whether the driver may wait for nodes: scaling.autoscaling when it says so, else what `detect` finds. The one
    rule for the driver's wait (cluster_autoscales) and jobs.submit's check (the dashboard's status)."""
    return detect() if s.autoscaling == "auto" else s.autoscaling


def no_autoscaling_reason(s: ScalingConfig) -> str:
    """Why a request the cluster lacks cannot be waited for, naming the field that decided it."""
    return ("scaling.autoscaling=false" if s.autoscaling is False
            else "no autoscaler was detected; scaling.autoscaling=true if it has one")


def autoscaling_node_types(node_type_mapping: dict[str, str]) -> bool:
    """True when the monitor's node-type mapping names configured node types, not the read-only node_<id>."""
    return any(kind != f"node_{node}" for node, kind in node_type_mapping.items())


def await_worker_resources(s: ScalingConfig, *, autoscales: bool | None = None,
                           poll_s: float = 5.0, say: Callable[[str], None] = print) -> None:
    """Return once the cluster can place the worker group; raise ConfigError naming the field otherwise."""
    import ray
    missing = shortfall(s, ray.cluster_resources(), live_nodes())
    if not missing:
        return
    if autoscales is None:
        autoscales = may_autoscale(s, cluster_autoscales)
    if not autoscales or s.resource_wait_s <= 0:
        why = "scaling.resource_wait_s=0" if autoscales else no_autoscaling_reason(s)
        raise ConfigError("; ".join(missing) + f" and it cannot autoscale ({why}): Ray would wait forever")
    from ray.autoscaler.sdk import request_resources
    bundle = worker_resources(s)
    request_resources(bundles=[bundle] * s.num_workers)  # demand the autoscaler sees before any task exists
    say(f"[train] waiting up to {s.resource_wait_s} s (scaling.resource_wait_s) for the autoscaler: "
        + "; ".join(missing))
    start = last = time.monotonic()
    try:
        while missing:
            if time.monotonic() - start > s.resource_wait_s:
                raise ConfigError("; ".join(missing) + f", still after waiting {s.resource_wait_s} s for the "
                                  "autoscaler (scaling.resource_wait_s): check the worker group's maxReplicas / "
                                  "max_workers and the cloud's GPU quota")
            time.sleep(poll_s)
            missing = shortfall(s, ray.cluster_resources(), live_nodes())
            if missing and time.monotonic() - last >= 30:
                last = time.monotonic()
                say(f"[train] still waiting ({time.monotonic() - start:.0f} s): " + "; ".join(missing))
        say(f"[train] the cluster has the worker group's resources after {time.monotonic() - start:.0f} s")
    finally:
        request_resources(bundles=[])  # the worker group's own demand keeps the nodes from here on
