"""The driver's resource check: fail fast on a fixed cluster, wait (bounded) for an autoscaling one.

The autoscaling case runs Ray's own autoscaler for real against its fake multi-node provider (RAY_FAKE_CLUSTER=1):
a head with 1 CPU and a `gpu_worker` node type at min_workers 0, as the launcher and KubeRay configs ship. Its
"GPU" is a logical resource (no CUDA is touched): what is tested is that the driver is seen to be on an autoscaling
cluster, asks for the bundles, and goes on once the autoscaler has added the node.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from infra.local_stack import RayHead
from pipeline.cluster.resources import autoscaling_node_types, await_worker_resources, cluster_autoscales
from pipeline.train import config
from pipeline.train.config import ConfigError, ScalingConfig

# these tests start Ray clusters, a local stack or jobs of their own (tests/conftest.py: make test-unit skips them)
pytestmark = pytest.mark.services

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_read_only_monitor_is_not_an_autoscaler():
    assert not autoscaling_node_types({"abc": "node_abc", "def": "node_def"})
    assert autoscaling_node_types({"abc": "head", "def": "gpu_worker"})
    assert not autoscaling_node_types({})


def test_detection_waits_for_the_monitors_first_report_and_no_longer():
    """A driver started with its cluster can ask before the monitor's first report (CI did): absence is 'not yet',
    bounded by report_wait_s; a report answers at once; a read that times out is asked again; one whose import or
    attribute is gone (Ray's internals moved) is 'no' at once."""
    answers = iter([None, None, True])
    t = time.monotonic()
    assert cluster_autoscales(report_wait_s=10, poll_s=0.05, read=lambda: next(answers)) is True
    assert time.monotonic() - t < 5
    assert cluster_autoscales(report_wait_s=10, poll_s=0.05, read=iter([None, False]).__next__) is False
    t = time.monotonic()
    assert cluster_autoscales(report_wait_s=0.3, poll_s=0.05, read=lambda: None) is False
    assert 0.3 <= time.monotonic() - t < 3

    def moved():
        raise AttributeError("ray._private.ray_constants has no DEBUG_AUTOSCALING_STATUS")
    t = time.monotonic()
    assert cluster_autoscales(report_wait_s=10, read=moved) is False
    assert time.monotonic() - t < 1
    reads = iter([TimeoutError("GCS internal_kv_get timed out"), True])
    assert cluster_autoscales(report_wait_s=10, poll_s=0.05, read=lambda: _raise_or_return(next(reads))) is True


def _raise_or_return(x):
    if isinstance(x, Exception):
        raise x
    return x


def test_fixed_cluster_fails_at_once(ray_cluster):
    assert cluster_autoscales() is False  # the session's plain local cluster
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"need 2 GPUs, the cluster has 0 and it cannot autoscale"):
        await_worker_resources(ScalingConfig(num_workers=2, use_gpu=True, cpus_per_worker=0.1))
    assert time.monotonic() - t < 5


def test_the_config_says_whether_the_cluster_autoscales_when_detection_cannot(ray_cluster):
    """scaling.autoscaling overrides detection (which reads Ray internals): true waits on this fixed cluster (bounded
    by resource_wait_s), false fails at once; the submit-time check follows the same word."""
    from pipeline.cluster.submission import ClusterState, SubmitError, check_resources
    said = []
    with pytest.raises(ConfigError, match=r"need 1 GPUs, the cluster has 0, still after waiting 1 s"):
        await_worker_resources(ScalingConfig(num_workers=1, use_gpu=True, cpus_per_worker=0.1, resource_wait_s=1,
                                             autoscaling=True), poll_s=0.5, say=said.append)
    assert said and "waiting up to 1 s" in said[0]
    with pytest.raises(ConfigError, match=r"cannot autoscale \(scaling.autoscaling=false\)"):
        await_worker_resources(ScalingConfig(num_workers=1, use_gpu=True, cpus_per_worker=0.1, autoscaling=False),
                               say=said.append)
    with pytest.raises(ConfigError, match=r"no autoscaler was detected; scaling.autoscaling=true if it has one"):
        await_worker_resources(ScalingConfig(num_workers=1, use_gpu=True, cpus_per_worker=0.1))

    def job(autoscaling):
        return config.load(None, ["scaling.use_gpu=true", "scaling.num_workers=1",
                                  f"scaling.autoscaling={autoscaling}"])
    fixed, autoscaling = ClusterState({"CPU": 2.0}, autoscales=False), ClusterState({"CPU": 2.0}, autoscales=True)
    check_resources(job("true"), fixed)
    check_resources(job("auto"), autoscaling)
    with pytest.raises(SubmitError, match="scaling.autoscaling=true if it has one"):
        check_resources(job("auto"), fixed)
    with pytest.raises(SubmitError, match="need 1 GPUs, the cluster has 0, and scaling.autoscaling=false"):
        check_resources(job("false"), autoscaling)
    with pytest.raises(config.ConfigError, match="scaling.autoscaling: must be 'auto' or a valid boolean, got 'maybe'"):
        config.load(None, ["scaling.autoscaling=maybe"])


def test_wait_is_bounded_and_names_what_is_missing(ray_cluster):
    said = []
    with pytest.raises(ConfigError, match=r"need 1 GPUs, the cluster has 0, still after waiting 2 s"):
        await_worker_resources(ScalingConfig(num_workers=1, use_gpu=True, cpus_per_worker=0.1, resource_wait_s=2),
                               autoscales=True, poll_s=0.5, say=said.append)
    assert said and "waiting up to 2 s (scaling.resource_wait_s)" in said[0]


def _autoscaling_config(gcs_port: int) -> dict:
    no_commands = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")}
    return {"cluster_name": "fake", "max_workers": 1, "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
            "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}"},
            "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                               "max_workers": 1}},
            **no_commands}


class AutoscalingHead(RayHead):
    def __init__(self, root):
        super().__init__(root, num_cpus=1, env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                                "RAY_AUTH_MODE": "disabled"})
        (self.root / "autoscaling.json").write_text(json.dumps(_autoscaling_config(self.port)))

    def command(self):
        return super().command() + [f"--autoscaling-config={self.root / 'autoscaling.json'}"]

    def env(self):
        # the fake provider's nodes join with `ray start --address`, which Ray refuses in single-machine mode:
        # this head listens on every interface, as a head of a real autoscaling cluster does
        env = super().env()
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        return env


def test_driver_waits_for_the_autoscaler_to_add_gpu_nodes(tmp_path):
    head = AutoscalingHead(tmp_path)
    head.start()
    try:
        code = (
            "import ray, time\n"
            "ray.init(logging_level='ERROR')\n"
            "from pipeline.cluster.resources import cluster_autoscales, await_worker_resources\n"
            "from pipeline.train.config import ScalingConfig\n"
            "print('autoscales', cluster_autoscales(), 'gpus before', ray.cluster_resources().get('GPU', 0))\n"
            "await_worker_resources(ScalingConfig(num_workers=1, use_gpu=True, cpus_per_worker=0.5, "
            "resource_wait_s=120), poll_s=1)\n"
            "print('gpus after', ray.cluster_resources().get('GPU', 0))\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "autoscales True gpus before 0" in r.stdout
        assert "waiting up to 120 s (scaling.resource_wait_s) for the autoscaler" in r.stdout
        assert "the cluster has the worker group's resources after" in r.stdout
        assert "gpus after 1.0" in r.stdout
    finally:
        head.stop()


def test_strict_spread_needs_a_node_per_worker_and_counts_only_nodes_that_hold_one():
    from pipeline.cluster.failures import placement_retries
    from pipeline.cluster.resources import shortfall
    s = ScalingConfig(num_workers=2, cpus_per_worker=0.49, placement_strategy="STRICT_SPREAD")
    both = {"CPU": 2.0}
    assert shortfall(s, both, [{"CPU": 1.0}, {"CPU": 1.0}]) == []
    (why,) = shortfall(s, both, [{"CPU": 1.6}, {"CPU": 0.4}])  # enough CPUs in all, one node too small
    assert why.startswith("scaling.placement_strategy: STRICT_SPREAD") and "1 of the cluster's 2 live node(s)" in why
    assert shortfall(ScalingConfig(num_workers=2, cpus_per_worker=0.49), both, [{"CPU": 2.0}]) == []  # PACK
    # Ray retries a placement in attempts of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s): the wait rounds up
    assert [placement_retries(w) for w in (1, 60, 61, 600)] == [0, 0, 1, 9]


def test_key_audit_keeps_the_newest_record_of_a_replayed_step(tmp_path):
    import numpy as np

    from pipeline.train.key_audit import KeyAudit, trained_keys
    first = KeyAudit(str(tmp_path), rank=0)
    for step, keys in [(1, [[0, 1], [2, -1]]), (2, [[3, 4], [5, 6]]), (3, [[9, 9], [9, 9]])]:
        first.record(step, 0, np.array(keys))
    first.close()  # killed after step 3; the checkpoint was of step 2
    again = KeyAudit(str(tmp_path), rank=0)
    again.record(3, 0, np.array([[7, 8], [-1, -1]]))
    again.record(4, 1, np.array([[0, 1], [2, 3]]))
    again.close()
    assert trained_keys(tmp_path, epoch=0) == {(0, 1): [0, 1, 2], (0, 2): [3, 4, 5, 6], (0, 3): [7, 8]}
