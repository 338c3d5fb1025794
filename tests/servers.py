"""Real local dependencies for tests: an S3 server (moto), a Ray head, and gRPC servers in a background loop."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from services.core.ray_head import RayHead as CoreRayHead

S3_KEYS = {"TUNERY_S3_ACCESS_KEY": "tunery-test", "TUNERY_S3_SECRET_KEY": "tunery-test-secret"}
REPO = Path(__file__).resolve().parent.parent


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


class RayHead(CoreRayHead):
    """The suite's Ray head (services.core.ray_head.RayHead), started at once, with its own HOME and temp dir;
    `ray_bin`: which installation's `ray` (default this interpreter's)."""

    def __init__(self, env: dict[str, str], num_cpus: int = 2, ray_bin: Path | None = None):
        tmp = Path(tempfile.mkdtemp(prefix="tr-", dir="/tmp"))  # short: Ray's unix sockets live below it
        (tmp / "home").mkdir()
        # no token auth (loopback only); queued jobs give up after 10 minutes
        super().__init__(tmp, {**env, "HOME": str(tmp / "home"), "RAY_TMPDIR": str(tmp),
                               "RAY_JOB_START_TIMEOUT_SECONDS": "600", "RAY_AUTH_MODE": "disabled"},
                         num_cpus=num_cpus, ray_bin=ray_bin)
        self.dir = tmp
        self.start()

    def stop(self, grace: float = 30.0) -> None:
        super().stop(grace)
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
