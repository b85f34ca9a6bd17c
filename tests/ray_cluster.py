"""A real multi-node Ray cluster on this machine, on loopback only, for the Ray runtime's tests and bench.

Each node is a `ray start --block` process in its own process group (so a node is removed by
killing its group: the raylet and its workers die as on a lost machine), with its own environment:
its own IMAGEGEN_HOME (model cache, worker records), logical GPUs (--num-gpus) and labels. Ray
resolves 127.0.0.1 to the machine's outward address; the nodes are kept on loopback by starting
them through a wrapper that skips that, and drivers by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which
only changes the address a driver picks for itself).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
         "from ray.scripts.scripts import main; sys.argv = ['ray'] + sys.argv[1:]; main()")
DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayNode:
    name: str
    home: Path
    process: subprocess.Popen
    gpus: int
    labels: dict = field(default_factory=dict)
    killed: bool = False

    def kill(self) -> None:
        """The node is lost: its raylet and everything it started die at once, its imagegen workers
        too (they run in sessions of their own, which a lost machine would take with it)."""
        self.killed = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        self.stop_workers()

    def leave(self) -> None:
        """The node leaves the cluster in good order (its raylet tells the head at once), its workers stopped."""
        self.killed = True
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.stop_workers()

    def stop_workers(self) -> None:
        subprocess.run([sys.executable, str(REPO / "generate_image.py"), "stop", "--all"], capture_output=True,
                       timeout=120, env={**os.environ, "IMAGEGEN_HOME": str(self.home), "IMAGEGEN_RUNTIME": "local"})


class RayCluster:
    """Head (no GPUs) plus GPU nodes; `token=None` starts it without token authentication."""

    def __init__(self, root: Path, token: str | None = "", base_env: dict | None = None):
        self.root = root
        self.token = secrets.token_hex(16) if token == "" else token
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.base_env = dict(base_env or {})
        self.nodes: list[RayNode] = []
        self.head: RayNode | None = None
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="igray-"))  # short: Ray's socket paths must fit 107 bytes

    def auth_env(self) -> dict:
        if self.token is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def driver_env(self) -> dict:
        """What a driver (the CLI) on this machine needs to reach the cluster."""
        return {**DRIVER_ENV, **self.auth_env(), "RAY_ADDRESS": self.address}

    def _start(self, name: str, args: list[str], gpus: int, env: dict, labels: dict) -> RayNode:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        full = {**os.environ, **self.base_env, **env, **self.auth_env(), "IMAGEGEN_HOME": str(home),
                "RAY_USAGE_STATS_ENABLED": "0"}
        for variable in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            full.pop(variable, None)
        if labels:
            args = [*args, "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items())]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the node's life
        process = subprocess.Popen([sys.executable, "-c", START, "start", "--block", "--node-ip-address=127.0.0.1",
                                    f"--num-gpus={gpus}", "--num-cpus=2", "--object-store-memory=80000000",
                                    f"--dashboard-agent-listen-port={free_port()}",  # two clusters side by side
                                    "--disable-usage-stats", *args],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full,
                                   start_new_session=True)
        node = RayNode(name, home, process, gpus, labels)
        return node

    def start_head(self) -> RayNode:
        self.head = self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                                         f"--temp-dir={self.ray_tmp}"], 0, {}, {})
        self.wait_for(1)
        return self.head

    def add_node(self, name: str, gpus: int = 1, env: dict | None = None, labels: dict | None = None) -> RayNode:
        node = self._start(name, [f"--address={self.address}"], gpus, env or {}, labels or {})
        self.nodes.append(node)
        self.wait_for(1 + len([n for n in self.nodes if not n.killed]))
        return node

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        try:
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **self.driver_env()})
        except subprocess.TimeoutExpired:
            return -1  # its GCS is not up yet (or its head died: wait_for says which)
        lines = result.stdout.strip().splitlines()
        return int(lines[-1]) if result.returncode == 0 and lines and lines[-1].isdigit() else -1

    def wait_for(self, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in [self.head, *self.nodes]:
                if node is not None and not node.killed and node.process.poll() is not None:
                    log = (self.root / f"{node.name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"ray node {node.name} exited: {log}")
            if self.alive_nodes() == count:
                return
            time.sleep(1.0)
        raise TimeoutError(f"the Ray cluster did not reach {count} alive nodes within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop this cluster's own processes (by their process groups; never `ray stop`)."""
        for node in [*self.nodes, self.head]:
            if node is None or node.process.poll() is not None:
                continue
            try:
                os.killpg(node.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for node in [*self.nodes, self.head]:
            if node is None:
                continue
            node.stop_workers()
            try:
                node.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
