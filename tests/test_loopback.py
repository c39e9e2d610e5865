"""No server of a local cluster listens beyond loopback (pipeline.cluster.loopback): auth is off on them.

Checked to fail before the change: the GCS, raylets, core workers and the dashboard agent listened on every
interface (`*:port`, `0.0.0.0:port`) and the runtime-env agent on the machine's address."""
from __future__ import annotations

import ipaddress
import os
import pathlib
import subprocess
import sys
import textwrap

from tests.infra_helpers import REPO
import pytest

# these tests start Ray clusters, a local stack or jobs of their own (tests/conftest.py: make test-unit skips them)
pytestmark = pytest.mark.services


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket the processes `pids` listen on, from /proc (Linux)."""
    inodes: dict[int, int] = {}
    for pid in pids:
        try:
            for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[int(target[8:-1])] = pid
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            raw, port = local.split(":")
            packed = bytes.fromhex(raw)
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(packed[i:i + 4][::-1] for i in range(0, width, 4))
            out.append((str(ipaddress.ip_address(words)), int(port, 16), inodes[inode]))
    return out


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in pathlib.Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(p.name))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        seen.add(pid)
        todo += children.get(pid, [])
    return seen


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_the_drivers_local_cluster_listens_on_loopback_only():
    """The cluster jobs.train starts for itself (driver.connect), with a task run so a worker is up."""
    script = textwrap.dedent("""
        import json, os, ray
        from pipeline.cluster import driver
        from pipeline.train import config
        from tests.test_loopback import descendants, listening
        driver.connect(config.load(None, ["scaling.num_workers=1"]))
        ray.get(ray.remote(lambda: 1).remote())
        print("SOCKETS " + json.dumps(listening(descendants(os.getpid()))))
        ray.shutdown()
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    sockets = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("SOCKETS "))[8:])
    assert len(sockets) >= 5, sockets  # GCS, raylet (2), dashboard, a worker: the listing found them
    assert [s for s in sockets if not loopback(s[0])] == [], sockets


# the local stack's `ray start --head` and a node joining it: tests/test_cluster_two_nodes.py, on that test's cluster
