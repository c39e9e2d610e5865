"""Local Ray clusters listen on 127.0.0.1 only.

A cluster that `ray.init(address="local")` or the local stack's `ray start --head` starts runs with auth off, and
its GCS, raylet, workers and agents listen on every interface by default: anyone on the network could submit
work to it. Ray binds its servers to loopback when the node's IP is 127.0.0.1, but it replaces an explicit
127.0.0.1 (`--node-ip-address`, `_node_ip_address`) with the machine's reachable IP, except in its single-machine
mode (what it uses on macOS and Windows): `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`. Read once at import by Ray, so
a process that has imported Ray already sets the constant it became (`loopback_node`). A node joining a head on
127.0.0.1 takes its IP from the head's address and is loopback too; it must not run in that mode (Ray refuses
to join in it). tests/test_redaction.py lists the sockets.
"""
from __future__ import annotations

import contextlib

SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the environment of `ray start --head`


@contextlib.contextmanager
def loopback_node():
    """Within it, a Ray node this process starts (ray.init(address="local")) takes 127.0.0.1 as its IP."""
    from ray._private import ray_constants
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
