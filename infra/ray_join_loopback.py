"""`ray start --address 127.0.0.1:<port>` for a node joining a local stack's head, kept on loopback.

The head runs in Ray's single-machine mode and listens on 127.0.0.1 only (pipeline.cluster.loopback). A joining
node may not use that mode (Ray refuses), and in the other one Ray rewrites the head's 127.0.0.1 to this machine's
reachable address, where the head does not listen. Here that one rewrite is turned off, so the node dials the
head on 127.0.0.1 and, seen from there, takes 127.0.0.1 as its own IP: its servers bind loopback as well.
Used by infra.local_stack.RayNode only (one machine standing in for several).
"""
import sys

from ray._private import services

services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
