"""A local Ray head (`ray start --head --block`) on 127.0.0.1 as a child process in its own session: the embedded
stack's cluster, and the test suite's.

    head = RayHead(Path("/tmp/tunery-ray"), num_cpus=2, log_path=home / "logs" / "ray.log").start()
    head.address        # the job API (dashboard), what TUNERY_RAY_ADDRESS takes
    head.gcs_address    # what RAY_ADDRESS / ray.init take
    head.stop()

Every port is a free one the kernel handed out (never Ray's fixed defaults), so two clusters can share a machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from services.core.net import LOOPBACK, free_port
from services.core.processes import alive, stop_group

# what every head we start gets unless the caller says otherwise: no usage stats; and no drain on SIGTERM (Ray
# would wait up to 30 s for leftover actors, which made `tunery down` take 32 s; a stopped stack kills its jobs)
DEFAULT_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


class RayHead:
    def __init__(self, temp_dir: Path, env: Mapping[str, str] | None = None, *, num_cpus: int = 0,
                 ray_bin: Path | None = None, log_path: Path | None = None):
        self.temp_dir = Path(temp_dir)  # keep it short: Ray's unix sockets live below it
        self.env = {**os.environ, **DEFAULT_ENV, **(env or {})}
        self.num_cpus = num_cpus
        self.ray_bin = ray_bin or Path(sys.executable).with_name("ray")
        self.log_path = log_path or self.temp_dir / "ray.log"
        self.dashboard_port, self.gcs_port = free_port(), free_port()
        self.pid = 0
        self.start_s = 0.0

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    def command(self) -> list[str]:
        cmd = [str(self.ray_bin), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
               f"--port={self.gcs_port}", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
               "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        return cmd + ([f"--num-cpus={self.num_cpus}"] if self.num_cpus else [])

    def start(self, timeout: float = 120.0) -> "RayHead":
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        try:
            wait_ray(self.address, timeout, lambda: alive(self.pid), self.log_path)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def stop(self, grace: float = 30.0) -> None:
        """`ray start --block` stops what it started, in order, on SIGTERM; stragglers of its group are killed."""
        stop_group(self.pid, grace)


def wait_ray(address: str, timeout: float, running=lambda: True, log_path: Path | None = None) -> None:
    """Until the job API at `address` answers; raises with the log's tail when the head exits or time runs out."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(address + "/api/version", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if not running():
            raise RuntimeError(f"the Ray head exited before its job API answered at {address}: {_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray head did not answer at {address} within {timeout:.0f}s: "
                               f"{_tail(log_path)}")
        time.sleep(0.25)


def _tail(path: Path | None, chars: int = 2000) -> str:
    if path is None:
        return "no log"
    try:
        return path.read_text(errors="replace")[-chars:] or "empty log"
    except OSError:
        return f"no log at {path}"
