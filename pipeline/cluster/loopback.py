"""Local Ray clusters listen on 127.0.0.1 only.

A cluster that `ray.init(address="local")` or the local stack's `ray start --head` starts runs with auth off, and
its GCS, raylet, workers and agents listen on every interface by default: anyone on the network could submit
work to it. Ray binds its servers to loopback when the node's IP is 127.0.0.1, but it replaces an explicit
127.0.0.1 (`--node-ip-address`, `_node_ip_address`) with the machine's reachable IP, except in its single-machine
mode (what it uses on macOS and Windows): `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`. Read once at import by Ray, so
a process that has imported Ray already sets the constant it became (`loopback_node`). A node joining a head on
127.0.0.1 takes its IP from the head's address and is loopback too; it must not run in that mode (Ray refuses
to join in it): infra/ray_join_loopback.py. A driver connecting to such a cluster keeps 127.0.0.1 the same way
(`node_context`). tests/test_loopback.py lists the sockets.
"""
from __future__ import annotations

import contextlib
import socket

SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the environment of `ray start --head`


def node_context(address: str):
    """Around ray.init(address=...): a driver of a cluster that listens on 127.0.0.1 only must keep that address
    (Ray would rewrite it to the machine's reachable IP, where such a cluster does not listen). A cluster named by
    127.0.0.1 that listens everywhere (a plain `ray start --head`) answers on the reachable IP too, and is joined
    the usual way, as its nodes expect."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        return contextlib.nullcontext()
    from ray._private import services
    reachable = services.node_ip_address_from_perspective()
    try:
        socket.create_connection((reachable, int(port)), timeout=2).close()
        return contextlib.nullcontext()
    except OSError:
        return loopback_node()


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
