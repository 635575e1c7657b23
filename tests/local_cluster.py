"""A real multi-node Ray cluster on one machine, for the cluster tests.

The head offers no CPUs (the driver runs there, as on `ray up cluster.yaml`). Each worker node is a
`ray start --block` inside its own mount namespace (`unshare -m`) with a private tmpfs over `nodes/`,
where every node keeps its HOME and Ray's session folder: a worker sees the shared folder (the run
folder and the cache, the "shared filesystem") and nothing the driver or the other worker writes.
A worker started with `private_shared=True` also gets a private tmpfs over the shared folder, like a
node that forgot to mount it. Token authentication is on, set up as Ray does it (`ray get-auth-token
--generate`); every process gets RAY_AUTH_MODE=token and the token's path.

Only the processes started here are stopped, by PID (never `ray stop`: it kills every Ray process of
the machine). Each node's `ray start --block` is its own session leader, so the node's daemons are
found by session id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

RAY = shutil.which("ray") or "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_unshare() -> bool:
    """Whether this process may create a mount namespace and mount a tmpfs (root, or a user namespace)."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


class LocalCluster:
    """Head + worker nodes under `root` (short: Ray's socket paths must fit 107 characters)."""

    def __init__(self, shared: Path, root: Optional[Path] = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="qpc", dir="/tmp"))
        self.shared = Path(shared)
        self.nodes = self.root / "nodes"
        self.nodes.mkdir(parents=True, exist_ok=True)
        self.token = self.root / "auth_token"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, home: Path, node: bool = False) -> dict[str, str]:
        """The environment of a process on this cluster: the driver on the head, or (`node`) a node's
        daemons, which start without this process's offline flags and cache path, as on a real cluster
        where they come only from the job's runtime_env."""
        drop = ("RAY_", "QPRUNER_", "HF_", "TRANSFORMERS_", "TOKENIZERS_") if node else ("RAY_", "QPRUNER_CACHE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token),
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        return env

    @property
    def head_home(self) -> Path:
        return self.nodes / "head"

    def start_head(self) -> None:
        self.head_home.mkdir(parents=True, exist_ok=True)
        env = self.env(self.head_home, node=True)
        env.pop("RAY_AUTH_TOKEN_PATH")
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        shutil.copy(self.head_home / ".ray" / "auth_token", self.token)
        self._start("head", [RAY, "start", "--head", "--num-cpus", "0", "--port", str(self.port),
                             "--temp-dir", str(self.head_home / "ray"), "--include-dashboard", "false", *self._common()],
                    self.env(self.head_home, node=True))

    def add_worker(self, name: str, cpus: int = 1, private_shared: bool = False) -> None:
        home = self.nodes / name
        hide = f"mount -t tmpfs tmpfs {self.nodes} && mkdir -p {home}"
        if private_shared:
            hide += f" && mount -t tmpfs tmpfs {self.shared}"
        start = " ".join([RAY, "start", "--address", self.address, "--num-cpus", str(cpus),
                          "--temp-dir", str(home / "ray"), *self._common()])
        self._start(name, ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{hide} && exec {start}"],
                    self.env(home, node=True))

    def _common(self) -> list[str]:
        return ["--object-store-memory", str(200 * 1024**2), "--disable-usage-stats", "--block"]

    def _start(self, name: str, argv: list[str], env: dict) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Wait until `count` nodes (head included) are alive, asking from a separate process."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["python", "-c", probe, self.address], env=self.env(self.head_home),
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        logs = "\n".join(p.read_text()[-1500:] for p in self.root.glob("*.log"))
        raise RuntimeError(f"the local cluster did not reach {count} nodes:\n{logs}")

    def stop(self) -> None:
        """Stop the nodes started here: SIGTERM each `ray start --block` (it shuts its node down), then
        SIGKILL whatever is left in their sessions."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            for pid in session_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()

    def delete_session_folders(self) -> None:
        """What a torn-down cluster leaves nowhere: every node's HOME and Ray session folder."""
        shutil.rmtree(self.nodes, ignore_errors=True)


def session_pids(sid: int) -> list[int]:
    """PIDs of the processes in session `sid` (the node's daemons)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids
