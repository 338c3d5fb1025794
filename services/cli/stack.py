"""The embedded stack: a local Ray head and every service on 127.0.0.1, with the store in a local directory
(or MinIO/S3 when given). State lives in $TUNERY_HOME (default ~/.tunery): token, stack.json, logs, store."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.processes import alive, stop_group
from services.core.ray_head import RayHead
from services.core.settings import SERVICE_PORTS, tunery_home

home = tunery_home


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


def ensure_token() -> str:
    p = home() / "token"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(secrets.token_urlsafe(32))
        p.chmod(0o600)
    return p.read_text().strip()


def health(port: int, service: str = "", timeout: float = 1.0) -> str:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        return f"DOWN ({e.code().name})"


def ray_temp_dir(tunery_home: Path) -> Path:
    """The Ray head's temp dir for the stack of this $TUNERY_HOME: one per home (two stacks of one user, e.g. two
    homes side by side, never share a Ray session folder), short because Ray's unix sockets live below it."""
    import hashlib

    digest = hashlib.sha256(str(tunery_home.resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"tunery-ray-{os.getuid()}-{digest}"


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
    state = StackState(store_url=env["TUNERY_STORE_URL"], started_at=time.time())
    t0 = time.monotonic()
    if ray_address:
        state.ray_address = ray_address
    else:
        on_step("starting the Ray head on 127.0.0.1")
        head = RayHead(ray_temp_dir(h), env, num_cpus=num_cpus, log_path=h / "logs" / "ray.log")
        head.start(timeout)
        state.ray_pid, state.ray_address, state.ray_start_s = head.pid, head.address, head.start_s
        state.save()
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


def down() -> bool:
    state = StackState.load()
    if state is None:
        return False
    stop_group(state.services_pid, 15.0)
    stop_group(state.ray_pid, 30.0)
    StackState.path().unlink(missing_ok=True)
    return True
