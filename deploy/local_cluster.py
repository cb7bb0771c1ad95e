"""A Ray cluster of several nodes on this machine, with Ray's own tooling (`ray start --head` and
`ray start --address=...`), to try multi-node serving without more machines:

    python deploy/local_cluster.py --workers 2          # prints the address; Ctrl-C stops every node
    mosaic-serve --address 127.0.0.2:<port> --proxy-location HeadOnly --num-replicas 2 \\
        --num-cpus-per-replica 1 --llm-resources '{"llm_node": 1}' --ingress-resources '{"head": 0.1}' \\
        --embedding-model none

The head node carries the custom resource `head` (for the ingress and the HTTP proxy), each worker node
`llm_node` (one LLM replica per node). Each node runs `ray start --block` in its own process group, so
killing that group takes the node away as a crash would (its raylet and every worker on it).
Nodes use 127.0.0.2: Ray rewrites 127.0.0.1 to the machine's outward address, other loopback addresses it
keeps, so the cluster never leaves the loopback interface. No dashboard, small object stores, temp files
under --temp-dir (never the home folder), RAY_AUTH_MODE=disabled.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE_IP = "127.0.0.2"
OBJECT_STORE_BYTES = 80 * 1000 * 1000  # Ray's minimum is 75 MB
NODE_ENV = {
    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # A crashed node is declared dead after ~3 s instead of ~15 s: replicas on it are replaced sooner.
    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
}
_RAY = str(Path(sys.executable).with_name("ray"))
# What `ray start --block` prints once its node is registered with the cluster.
_JOINED = "This command will now block forever"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, temp_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.temp_dir = Path(temp_dir)
        self.port = port or _free_port()
        self.env = {**os.environ, **NODE_ENV, **(env or {})}
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.dashboard_port: int | None = None
        self._head_args: list[str] = []
        self._head_log_offset = 0

    @property
    def address(self) -> str:
        return f"{NODE_IP}:{self.port}"

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = (self.temp_dir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [_RAY, "start", "--node-ip-address", NODE_IP, "--object-store-memory", str(OBJECT_STORE_BYTES),
             "--disable-usage-stats", "--block", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                   dashboard_port: int | None = None) -> None:
        """`dashboard_port`: run the dashboard there (what `serve deploy` and `ray list` talk to); else none."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        dashboard = ["--include-dashboard", "false"]
        if dashboard_port:
            dashboard = ["--include-dashboard", "true", "--dashboard-host", NODE_IP,
                         "--dashboard-port", str(dashboard_port)]
        self.dashboard_port = dashboard_port
        self._head_args = ["--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {"head": 1}),
                           *dashboard, "--temp-dir", str(self.temp_dir)]
        self._start_head()

    def _start_head(self) -> None:
        """`ray start --head` on self.port; what it logs from here on is this start's."""
        self._head_log_offset = self._log_size("head")
        self.head = self._start(["--head", "--port", str(self.port), *self._head_args], "head")

    def wait_for_head(self, timeout_s: float = 180, attempts: int = 3) -> None:
        """Until the head node is up (workers started before it give up after ~30 s).

        A head that exits first (its GCS port taken between choosing and binding it, or its raylet slow to
        register on a busy machine) is started again on a fresh port, up to `attempts` times in all."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(attempts):
            if self._joined(self.head, "head", self._head_log_offset, deadline):
                return
            if attempt + 1 < attempts and time.monotonic() < deadline:
                self.port = _free_port()
                self._start_head()
        raise RuntimeError(f"the head node did not start (logs in {self.temp_dir}); head.log ends:\n"
                           f"{self._log_tail('head')}")

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                   timeout_s: float = 240, attempts: int = 3) -> int:
        """Start a worker node and wait until it has joined; returns its index in `workers`.

        `ray start` gives up when its raylet takes over 30 s to register (a busy machine): start again."""
        index = len(self.workers)
        name = f"worker-{index}"
        args = ["--address", self.address, "--num-cpus", str(num_cpus),
                "--resources", json.dumps(resources or {"llm_node": 1})]
        deadline = time.monotonic() + timeout_s
        for _ in range(attempts):
            offset = self._log_size(name)
            proc = self._start(args, name)
            if self._joined(proc, name, offset, deadline):
                self.workers.append(proc)
                return index
        raise RuntimeError(f"worker node {index} did not join (logs in {self.temp_dir}); {name}.log ends:\n"
                           f"{self._log_tail(name)}")

    def _joined(self, proc: subprocess.Popen, name: str, offset: int, deadline: float) -> bool:
        """Whether `ray start` said its node is up (in its log past `offset`) before exiting or the deadline;
        a node that did not is killed with everything it started."""
        log = self.temp_dir / f"{name}.log"
        while proc.poll() is None and time.monotonic() < deadline:
            if _JOINED in log.read_bytes()[offset:].decode(errors="replace"):
                return True
            time.sleep(0.5)
        _kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=10)
        return False

    def _log_size(self, name: str) -> int:
        log = self.temp_dir / f"{name}.log"
        return log.stat().st_size if log.exists() else 0

    def _log_tail(self, name: str, size: int = 2000) -> str:
        log = self.temp_dir / f"{name}.log"
        return log.read_bytes()[-size:].decode(errors="replace") if log.exists() else ""

    def kill_worker(self, index: int) -> None:
        """Crash a worker node: SIGKILL to its raylet, its workers and everything else it started."""
        _kill_group(self.workers[index], signal.SIGKILL)

    def nodes(self) -> list[dict]:
        """The cluster's nodes (id, alive, resources)."""
        return self._ask("[{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources']} "
                         "for n in ray.nodes()]")

    def actors(self) -> list[dict]:
        """The cluster's live actors (class, name, node id), from the GCS (no dashboard needed)."""
        return self._ask("[{'class': a['ActorClassName'], 'name': a.get('Name'), "
                         "'node': a['Address']['NodeID']} for a in "
                         "__import__('ray._private.state', fromlist=['actors']).actors().values() "
                         "if a['State'] == 'ALIVE']")

    def _ask(self, expression: str) -> list[dict]:
        """`expression` evaluated in a short-lived driver process connected to the cluster, as JSON."""
        script = (f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False, "
                  f"logging_level='ERROR'); print(json.dumps({expression}))")
        done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"asking the cluster failed: {done.stderr[-1500:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def down(self) -> None:
        for proc in [*self.workers, self.head]:
            if proc is not None:
                _kill_group(proc, signal.SIGTERM)
        for proc in [*self.workers, self.head]:
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _kill_group(proc, signal.SIGKILL)
                    proc.wait(timeout=10)


def stop_group(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to a process started in a session of its own (and everything it started); SIGKILL if it is not
    gone within `timeout_s`."""
    _kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=10)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--port", type=int, help="head (GCS) port; default: a free one")
    parser.add_argument("--temp-dir", type=Path, help="Ray's temp dir (default: a new folder under /tmp)")
    args = parser.parse_args()
    # Short: Ray puts unix sockets under it, and their paths are limited to ~107 bytes.
    temp_dir = args.temp_dir or Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = LocalCluster(temp_dir, port=args.port)
    cluster.start_head(args.head_cpus)
    try:
        cluster.wait_for_head()
        for _ in range(args.workers):
            cluster.add_worker(args.worker_cpus)
        nodes = cluster.nodes()
        print(f"Ray cluster at {cluster.address}: {len(nodes)} nodes (logs in {temp_dir}). Deploy with:\n"
              f"  RAY_AUTH_MODE=disabled mosaic-serve --address {cluster.address} --proxy-location HeadOnly "
              f"--num-replicas {args.workers} --num-cpus-per-replica {args.worker_cpus} "
              "--llm-resources '{\"llm_node\": 1}' --ingress-resources '{\"head\": 0.1}' --embedding-model none\n"
              "Ctrl-C stops every node.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
