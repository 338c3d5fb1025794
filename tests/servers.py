"""Real local dependencies for tests: an S3 server (moto), a Ray head, and gRPC servers in a background loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

S3_KEYS = {"TUNERY_S3_ACCESS_KEY": "tunery-test", "TUNERY_S3_SECRET_KEY": "tunery-test-secret"}
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_loopback_namespace() -> bool:
    """True when the only network interface is loopback (what make test arranges with unshare -n)."""
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


class S3Server:
    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"{host}:{port}"

    def stop(self) -> None:
        self.server.stop()


class RayHead:
    """`ray start --head --block` as a child process on 127.0.0.1, with its own HOME and temp dir.
    `ray_bin`: which installation's `ray` (default this interpreter's); `gcs_address` is what RAY_ADDRESS takes."""

    def __init__(self, env: dict[str, str], num_cpus: int = 2, ray_bin: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="tr-", dir="/tmp"))  # short: Ray's unix sockets live below it
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.gcs_address = f"127.0.0.1:{free_port()}"
        # no drain on SIGTERM: Ray would wait up to 30 s for leftover actors; no token auth (loopback only)
        full_env = {**os.environ, **env, "HOME": str(self.dir / "home"), "RAY_TMPDIR": str(self.dir),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_JOB_START_TIMEOUT_SECONDS": "600",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "disabled"}
        (self.dir / "home").mkdir()
        ray = ray_bin or Path(sys.executable).with_name("ray")
        t0 = time.monotonic()
        self.log = open(self.dir / "ray.log", "wb")
        self.proc = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs_address.rsplit(':', 1)[1]}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.port}", f"--num-cpus={num_cpus}",
             f"--temp-dir={self.dir}", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            try:
                if requests.get(self.address + "/api/version", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"Ray head did not start: {(self.dir / 'ray.log').read_text()[-2000:]}")
            time.sleep(0.25)
        self.start_s = time.monotonic() - t0

    def stop(self) -> None:
        self.proc.terminate()  # `ray start` alone: it stops what it started, in order
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # stragglers of the head's own process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class ServerThread:
    """gRPC servers built by services.core.runtime.start, running on an event loop in a background thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self, settings, build, runtime=None) -> int:
        from services.core.runtime import start

        server, port = self.run(start(settings, build, runtime))
        self.servers.append(server)
        return port

    def stop_all(self, grace: float = 1.0) -> None:
        from services.core.server import stop_server

        for s in self.servers:
            self.run(stop_server(s, grace))
        self.servers.clear()

    def close(self) -> None:
        self.stop_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
