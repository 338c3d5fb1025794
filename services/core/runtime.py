"""Wiring shared by every service process: settings -> store, artifact store, job runner -> gRPC servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.core import logs
from services.core.artifacts import ArtifactStore
from services.core.jobs import JobRunner
from services.core.ray_jobs import RayJobRunner
from services.core.server import Registration, create_server, serve_until_signalled
from services.core.settings import ServiceSettings
from services.core.store import ObjectStore, open_store

log = logging.getLogger("tunery")


@dataclass
class Runtime:
    objects: ObjectStore
    artifacts: ArtifactStore
    runner: JobRunner
    # where each service of this process answers ({name: host:port}), filled once they all listen: what a job that
    # calls the services back (the pipeline's) is told
    endpoints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "Runtime":
        objects = open_store(settings)
        artifacts = ArtifactStore(objects, settings.project)
        return cls(objects, artifacts, RayJobRunner(settings, artifacts, settings.job_env()))

    def readiness(self) -> list[Callable[[], None]]:
        return [self.objects.ping, self.runner.ping]


# A service module exposes build(runtime, settings) -> Registration.
Builder = Callable[[Runtime, ServiceSettings], Registration]


async def start(settings: ServiceSettings, build: Builder, runtime: Runtime | None = None):
    runtime = runtime or Runtime.from_settings(settings)
    return await create_server(settings, [build(runtime, settings)], readiness=runtime.readiness())


def run_service(settings: ServiceSettings, build: Builder) -> None:
    """`python -m services.<name>`: serve one service until SIGTERM."""
    logs.configure(settings.log_level)

    async def main() -> None:
        server, port = await start(settings, build)
        write_ports_file({settings.service: port})
        await serve_until_signalled([server], settings.shutdown_grace_s)

    asyncio.run(main())


def run_many(services: Sequence[tuple[ServiceSettings, Builder]]) -> None:
    """The embedded stack: every service in one process, each on its own port, sharing one runtime."""
    logs.configure(services[0][0].log_level)

    async def main() -> None:
        runtime = Runtime.from_settings(services[0][0])
        started = [(s.service, await start(s, b, runtime)) for s, b in services]
        runtime.endpoints.update({name: f"127.0.0.1:{port}" for name, (_, port) in started})
        write_ports_file({name: port for name, (_, port) in started})
        await serve_until_signalled([server for _, (server, _) in started], services[0][0].shutdown_grace_s)

    asyncio.run(main())


def write_ports_file(ports: dict[str, int]) -> None:
    """Tell whoever started this process (`tunery up`) the ports the servers are bound to, so a stack can ask
    for port 0 and never race another process for a port. Written atomically once every server listens."""
    path = os.environ.get("TUNERY_PORTS_FILE")
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, path)
    log.info("listening", extra={"ports": ports})

