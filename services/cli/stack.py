"""The embedded stack: a local Ray head and every service on 127.0.0.1, with the store in a local directory
(or MinIO/S3 when given). State lives in $TUNERY_HOME (default ~/.tunery): token, stack.json, logs, store."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.sdk.client import SERVICE_PORTS


def home() -> Path:
    return Path(os.environ.get("TUNERY_HOME", Path.home() / ".tunery"))


@dataclass
class StackState:
    ray_pid: int = 0
    services_pid: int = 0
    ray_address: str = ""
    store_url: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    ray_start_s: float = 0.0
    ready_s: float = 0.0

    @staticmethod
    def path() -> Path:
        return home() / "stack.json"

    @classmethod
    def load(cls) -> "StackState | None":
        p = cls.path()
        return cls(**json.loads(p.read_text())) if p.exists() else None

    def save(self) -> None:
        self.path().write_text(json.dumps(asdict(self), indent=1))


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def ensure_token() -> str:
    p = home() / "token"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(secrets.token_urlsafe(32))
        p.chmod(0o600)
    return p.read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, service: str = "", timeout: float = 1.0) -> str:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        return f"DOWN ({e.code().name})"


def wait_ray(address: str, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(address + "/api/version", timeout=1).ok:
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the Ray head did not answer at {address} within {timeout:.0f}s (see {home() / 'logs'})")


def up(*, store_url: str = "", s3: dict[str, str] | None = None, ray_address: str = "", num_cpus: int = 0,
       timeout: float = 120.0, on_step=lambda s: None) -> StackState:
    state = StackState.load()
    if state and alive(state.services_pid):
        return state
    h = home()
    (h / "logs").mkdir(parents=True, exist_ok=True)
    ensure_token()
    env = dict(os.environ)
    env.update({k: v for k, v in (s3 or {}).items() if v})
    env["TUNERY_STORE_URL"] = store_url or env.get("TUNERY_STORE_URL") or "file://" + str(h / "store")
    env["TUNERY_TOKEN_FILE"] = str(h / "token")
    env["TUNERY_HOST"] = env.get("TUNERY_HOST", "127.0.0.1")
    env.setdefault("RAY_JOB_START_TIMEOUT_SECONDS", "86400")  # queued jobs wait for resources, not fail
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    state = StackState(store_url=env["TUNERY_STORE_URL"], started_at=time.time())
    t0 = time.monotonic()
    if ray_address:
        state.ray_address = ray_address
    else:
        on_step("starting the Ray head on 127.0.0.1")
        dash = free_port()
        ray_tmp = Path("/tmp") / f"tunery-ray-{os.getuid()}"
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=0",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={ray_tmp}",
               "--disable-usage-stats", "--include-dashboard=true",
               # free ports instead of Ray's fixed defaults, so two clusters can share a machine
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        if num_cpus:
            cmd.append(f"--num-cpus={num_cpus}")
        log = open(h / "logs" / "ray.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        state.ray_pid = proc.pid
        state.ray_address = f"http://127.0.0.1:{dash}"
        state.save()
        wait_ray(state.ray_address, timeout)
        state.ray_start_s = time.monotonic() - t0
    env["TUNERY_RAY_ADDRESS"] = state.ray_address
    for name, port in SERVICE_PORTS.items():
        env.setdefault(f"TUNERY_{name.upper()}_PORT", str(port))  # 0: the kernel picks, reported back below
    ports_file = h / "ports.json"
    ports_file.unlink(missing_ok=True)
    env["TUNERY_PORTS_FILE"] = str(ports_file)
    on_step("starting the services")
    log = open(h / "logs" / "services.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "services.embedded"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    state.services_pid = proc.pid
    state.save()
    deadline = time.monotonic() + timeout
    while not state.ports or health(state.ports["registry"]) != "SERVING":
        if not alive(proc.pid):
            raise RuntimeError(f"the services exited at start: {last_error(h / 'logs' / 'services.log')} "
                               f"(full log: {h / 'logs' / 'services.log'})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the services were not SERVING within {timeout:.0f}s; see {h / 'logs'}")
        if not state.ports and ports_file.exists():
            state.ports = {k: int(v) for k, v in json.loads(ports_file.read_text()).items()}
            state.save()
        time.sleep(0.2)
    state.ready_s = time.monotonic() - t0
    state.save()
    return state


def last_error(log: Path, lines: int = 3) -> str:
    """The last lines of a log, so a failed start says why without opening the file."""
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "no log"
    return " | ".join(line.strip()[:300] for line in tail) or "empty log"


def _stop(pid: int, grace: float) -> None:
    if not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)


def down() -> bool:
    state = StackState.load()
    if state is None:
        return False
    _stop(state.services_pid, 15.0)
    _stop(state.ray_pid, 30.0)
    StackState.path().unlink(missing_ok=True)
    return True
