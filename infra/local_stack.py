"""The cluster's services on one machine, all on 127.0.0.1: an MLflow server (sqlite backend, artifacts proxied by
the server), an S3 endpoint (moto server) and a Ray head with the dashboard and the Jobs API.

    python infra/local_stack.py up [--dir outputs/stack]    start them; writes <dir>/env (source it) and <dir>/stack.json
    python infra/local_stack.py down [--dir outputs/stack]  stop what `up` started, and every process under it
    python infra/local_stack.py status [--dir ...]          which of them are alive

Then, from the repository root:
    source outputs/stack/env
    python -m jobs.submit -- python -m jobs.train --config jobs/configs/local.yaml data.shards=s3://kpp-data/digits \
        checkpoint.storage_path=s3://kpp-runs/ray

The test suite starts its services with the same classes (tests/fixtures). Each service runs in a process session
of its own, so `down` ends exactly what `up` started (a server's forked workers, Ray's raylet, GCS, dashboard and
job drivers), never another Ray cluster of this machine, which `ray stop` would.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

if not __package__:  # run as a script (python infra/local_stack.py): `pipeline` is in the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pipeline.net import free_port  # noqa: E402
from pipeline.cluster.loopback import SINGLE_MACHINE_ENV  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
BUCKETS = ("kpp-data", "kpp-runs")
# moto accepts any credentials; these name a loopback test endpoint and are no secret
S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def stop_session(pid: int, timeout_s: float = 30) -> None:
    """SIGTERM to the process group `pid` leads (its own session), SIGKILL what is left after timeout_s."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not session_pids(pid):
                return
            time.sleep(0.2)


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux /proc): the leader and everything it started that stayed there."""
    out = []
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            out.append(int(p.name))
    return out


class Service:
    """One server process in a session of its own, its output in <root>/<name>.log."""

    name = "service"
    stop_grace_s = 30.0  # SIGTERM, then SIGKILL what is left after this long

    def __init__(self, root: pathlib.Path, port: int | None = None):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self, timeout_s: float) -> None:
        raise NotImplementedError

    def start(self, timeout_s: float = 90) -> None:
        with open(self.root / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                         cwd=self.root, start_new_session=True)
        self.ready(timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc.pid, self.stop_grace_s)
            self.proc.wait(timeout=5)
            self.proc = None

    close = stop


class MlflowServer(Service):
    """`mlflow server` over a sqlite store with proxied artifacts: clients need only the tracking URI, as with a
    team server. The job runner is off: with it the server takes ~2.4 GB instead of ~0.5 GB."""

    name = "mlflow"

    def __init__(self, root, port: int | None = None, artifacts: str = ""):
        super().__init__(root, port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts or str(self.root / "artifacts")

    def command(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", self.artifacts, "--workers", "1"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def ready(self, timeout_s: float) -> None:
        wait_http(f"{self.url}/health", self.proc, timeout_s, "mlflow server")


class S3Server(Service):
    """moto's S3 in server mode: a real HTTP endpoint that every process (s3fs, pyarrow, Ray workers) can reach."""

    name = "s3"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self, timeout_s: float) -> None:
        wait_http(f"{self.url}/moto-api/", self.proc, timeout_s, "moto server")

    def create_buckets(self, names) -> None:
        import boto3
        s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name=S3_REGION)
        for b in names:
            s3.create_bucket(Bucket=b)


class RayHead(Service):
    """`ray start --head --block` with the dashboard and Jobs API on 127.0.0.1. --block keeps the node in this
    process's session, so stopping the session stops the node and the job drivers it started. Every port is
    picked free, so the head coexists with any other Ray cluster on the machine (the test session's own)."""

    name = "ray"
    # on SIGTERM the raylet and its workers exit in ~8 s, but `ray start --block`, the GCS and the dashboard stay
    # until SIGKILL (measured, Ray 2.60): a longer grace only delays `down` (30 s each time)
    stop_grace_s = 10.0

    def __init__(self, root, port: int | None = None, num_cpus: int | None = None,
                 env: dict[str, str] | None = None):
        super().__init__(root, port)
        self.dashboard_port = free_port()
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.extra_env = dict(env or {})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        ports = {f"--{k}": str(free_port()) for k in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port",
                                                      "ray-client-server-port")}
        return [str(BIN / "ray"), "start", "--head", "--block", "--port", str(self.port),
                "--num-cpus", str(self.num_cpus), "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--disable-usage-stats",
                *[a for kv in ports.items() for a in kv]]

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join another cluster
        # auth is off: Ray's single-machine mode makes the node's IP 127.0.0.1 and every server bind to it
        # (pipeline.cluster.loopback); the processes of the cluster and the jobs it runs inherit it
        env.update(SINGLE_MACHINE_ENV)
        # the State API inside this cluster must find this head's dashboard, not resolve "auto" among several
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        # the job driver's Python must find this venv's packages and the project even outside the repo
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        return env

    def ready(self, timeout_s: float) -> None:
        wait_http(f"{self.dashboard_url}/api/version", self.proc, timeout_s, "ray head (dashboard)")

    def stop(self) -> None:
        super().stop()
        # `ray start` records its GCS in <temp>/ray_current_cluster, and Ray's "auto" address (the State API inside
        # any later cluster's processes, e.g. Train's placement-group cleaner) reads it: left pointing at this dead
        # head it makes those calls hang. `ray stop` removes it; so do we, if it is still ours.
        current = pathlib.Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
        try:
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()
        except OSError:
            pass


class RayNode(Service):
    """A second Ray node joining a head: `ray start --address <head> --block`, with its own CPUs, temp dir (its
    sockets, logs and the job's unpacked working dir) and process session, as another machine of the cluster
    would have. Killing its raylet (`raylet_pid`) is what losing that machine looks like to Ray."""

    stop_grace_s = 10.0

    def __init__(self, root, head: RayHead, name: str = "node1", num_cpus: int = 1,
                 env: dict[str, str] | None = None):
        super().__init__(root)
        self.name, self.head, self.num_cpus = name, head, num_cpus
        self.extra_env = dict(env or {})
        # a short path of its own: Ray's unix sockets live under it and must stay within 107 bytes
        import tempfile
        self.temp_dir = tempfile.mkdtemp(prefix=f"kpp-{name}-")

    def command(self) -> list[str]:
        ports = {f"--{k}": str(free_port()) for k in ("node-manager-port", "object-manager-port",
                                                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port")}
        # `ray start`, keeping the head's loopback address as it is (infra/ray_join_loopback.py)
        return [str(BIN / "python"), str(pathlib.Path(__file__).with_name("ray_join_loopback.py")), "start",
                "--address", self.head.address, "--block", "--num-cpus",
                str(self.num_cpus), "--temp-dir", self.temp_dir, "--disable-usage-stats",
                *[a for kv in ports.items() for a in kv]]

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        # joining the head on 127.0.0.1 makes this node's IP 127.0.0.1; Ray refuses to join in single-machine mode
        for k in SINGLE_MACHINE_ENV:
            env.pop(k, None)
        env["RAY_API_SERVER_ADDRESS"] = self.head.dashboard_url
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        return env

    def ready(self, timeout_s: float) -> None:
        """Once the head's dashboard lists this node as alive (its temp dir names it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray node {self.name} exited with {self.proc.returncode} before joining")
            if self.node_id():
                return
            time.sleep(0.5)
        raise TimeoutError(f"ray node {self.name} did not join {self.head.address} within {timeout_s:.0f} s")

    def node_id(self) -> str:
        """This node's id while the head counts it alive, else ''."""
        try:
            with urllib.request.urlopen(f"{self.head.dashboard_url}/nodes?view=summary", timeout=5) as r:
                nodes = json.load(r)["data"]["summary"]
        except (OSError, KeyError, ValueError):
            return ""
        for n in nodes:
            raylet = n.get("raylet", {})
            if raylet.get("state") == "ALIVE" and str(raylet.get("nodeManagerPort")) == self._port_of("node"):
                return raylet.get("nodeId", "")
        return ""

    def _port_of(self, what: str) -> str:
        args = self.proc.args if self.proc is not None else []
        flag = f"--{what}-manager-port"
        return args[args.index(flag) + 1] if flag in args else ""

    def raylet_pid(self) -> int | None:
        for pid in session_pids(self.proc.pid) if self.proc is not None else []:
            try:
                exe = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if exe.endswith(b"/raylet"):
                return pid
        return None

    def stop(self) -> None:
        super().stop()
        import shutil
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class LocalStack:
    """The three services, with the environment a client (or a job driver on the head) needs to use them."""

    dir: pathlib.Path
    num_cpus: int | None = None
    ray_env: dict[str, str] = field(default_factory=dict)  # more environment for the Ray nodes (and their jobs)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self):
        self.dir = pathlib.Path(self.dir).resolve()

    @property
    def client_env(self) -> dict[str, str]:
        s3, mlflow = self.services["s3"], self.services["mlflow"]
        return {"MLFLOW_TRACKING_URI": mlflow.url, "AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": S3_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": S3_REGION,
                # token auth keeps one token in ~/.ray/auth_token, shared by every cluster this user starts on
                # the machine: a second cluster rewrites it and locks the first one's drivers out. Loopback: off.
                "RAY_AUTH_MODE": "disabled"}

    @property
    def env(self) -> dict[str, str]:
        """What a user sources: the services' addresses. RAY_API_SERVER_ADDRESS is the Jobs API (`ray job submit`,
        jobs.submit); RAY_ADDRESS the GCS, for a driver started on this machine outside a job."""
        ray = self.services["ray"]
        return {**self.client_env, "RAY_API_SERVER_ADDRESS": ray.dashboard_url, "RAY_ADDRESS": ray.address}

    def up(self) -> "LocalStack":
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            s3 = self.services["s3"] = S3Server(self.dir)
            s3.start()
            s3.create_buckets(BUCKETS)
            mlflow = self.services["mlflow"] = MlflowServer(self.dir)
            mlflow.start()
            # job drivers and Ray workers inherit the head's environment: the services' addresses reach every job
            # the way a cluster's ConfigMap and Secret do (infra/kuberay)
            from pipeline.cluster.driver import RAY_ENV
            ray = self.services["ray"] = RayHead(self.dir, num_cpus=self.num_cpus,
                                                 env={**self.client_env, **RAY_ENV, **self.ray_env})
            ray.start()
        except BaseException:
            self.down()
            raise
        self._write_state()
        return self

    def add_node(self, num_cpus: int = 1, timeout_s: float = 180) -> RayNode:
        """Another Ray node joining the head (a second machine, on this one); `down` stops it with the rest."""
        head = self.services["ray"]
        name = f"node{sum(isinstance(s, RayNode) for s in self.services.values()) + 1}"
        node = self.services[name] = RayNode(self.dir, head, name, num_cpus, env=head.extra_env)
        try:
            node.start(timeout_s)
        except BaseException:
            self.services.pop(name).stop()
            raise
        self._write_state()
        return node

    def _write_state(self) -> None:
        (self.dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in self.env.items()))
        (self.dir / "stack.json").write_text(json.dumps(
            {name: {"pid": s.proc.pid, "port": s.port} for name, s in self.services.items() if s.proc}))

    def pids(self) -> list[int]:
        """Every live process the stack started (the services' sessions)."""
        state = self.dir / "stack.json"
        sids = [s.proc.pid for s in self.services.values() if s.proc] or (
            [v["pid"] for v in json.loads(state.read_text()).values()] if state.exists() else [])
        return sorted(p for sid in sids for p in session_pids(sid))

    def down(self) -> None:
        """Stop the Ray head first (its job drivers may still be talking to S3 and MLflow), then the servers."""
        state = self.dir / "stack.json"
        if not self.services and state.exists():  # another process ran `up`: stop by the recorded sessions
            recorded = json.loads(state.read_text())
            for name in [*sorted(n for n in recorded if n.startswith("node")), "ray", "mlflow", "s3"]:
                rec = recorded.get(name)
                if rec:
                    stop_session(rec["pid"], RayHead.stop_grace_s if name.startswith(("node", "ray")) else 30)
        for name in [*sorted(n for n in self.services if n.startswith("node")), "ray", "mlflow", "s3"]:
            svc = self.services.pop(name, None)
            if svc is not None:
                svc.stop()
        state.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python infra/local_stack.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--dir", default="outputs/stack", help="state, logs, the sqlite store and artifacts")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the Ray head (default: all)")
    ap.add_argument("--worker-nodes", type=int, default=0,
                    help="more Ray nodes joining the head (1 CPU each), as the other machines of a cluster")
    args = ap.parse_args(argv)
    stack = LocalStack(pathlib.Path(args.dir), num_cpus=args.num_cpus)
    if args.action == "up":
        if stack.pids():
            print(f"a stack is already up (state in {stack.dir}); `down` it first", file=sys.stderr)
            return 2
        stack.up()
        for _ in range(args.worker_nodes):
            stack.add_node()
        e = stack.env
        print(f"up: Ray dashboard and Jobs API {e['RAY_API_SERVER_ADDRESS']} (GCS {e['RAY_ADDRESS']}), "
              f"MLflow {e['MLFLOW_TRACKING_URI']}, S3 {e['AWS_ENDPOINT_URL']} (buckets {', '.join(BUCKETS)})")
        print(f"next: source {stack.dir / 'env'}")
    elif args.action == "down":
        stack.down()
        print("down")
    else:
        pids = stack.pids()
        print(f"{len(pids)} process(es) of the stack alive" + (f": {pids}" if pids else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # pipeline.* from the repository root
    sys.exit(main())
