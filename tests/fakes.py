"""Fakes for unit tests. Each implements the same Protocol as the real thing (services.core.jobs.JobRunner; an
OpenAI-compatible HTTP server)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.core.artifacts import ArtifactStore
from services.core.errors import AlreadyExists, NotFound
from services.core.job_store import JobFiles
from services.core.jobs import (
    JobEvent,
    JobRecord,
    JobRequest,
    JobRunner,
    JobState,
    spec_sha256,
)


class FakeRunner:
    """Jobs held in memory; events go through the real JobFiles in the given store. Tests drive the states."""

    def __init__(self, artifacts: ArtifactStore):
        self.artifacts = artifacts
        self.jobs: dict[str, JobRecord] = {}
        self.submitted: list[JobRequest] = []
        self.cluster: list[dict[str, float]] = [{"CPU": 2.0, "memory": 8 * 2**30}]  # what nodes() reports

    def ping(self) -> None:
        return None

    def nodes(self) -> list[dict[str, float]]:
        return self.cluster

    def submit(self, req: JobRequest) -> JobRecord:
        job_id = req.idempotency_key or f"{req.service}-{uuid.uuid4().hex[:12]}"
        digest = spec_sha256(req.kind, self.artifacts.project, req.spec)
        if job_id in self.jobs:
            if self.jobs[job_id].spec_sha256 != digest:
                raise AlreadyExists(f"idempotency key {job_id!r} is already used by a job with a different spec")
            return self.jobs[job_id]
        self.submitted.append(req)
        rec = JobRecord(id=job_id, kind=req.kind, service=req.service, state=JobState.QUEUED, created_at=time.time(),
                        spec=req.spec, spec_sha256=digest, resources=req.resources, labels=req.labels)
        self.jobs[job_id] = rec
        return rec

    def get(self, job_id: str, *, with_spec: bool = True) -> JobRecord:
        if job_id not in self.jobs:
            raise NotFound(f"job {job_id} not found")
        return self.jobs[job_id]

    def list(self, *, service: str = "", kind: str = "", states=None, offset: int = 0, limit: int = 50):
        jobs = [j for j in self.jobs.values() if (not service or j.service == service) and (not kind or j.kind == kind)
                and (not states or j.state in states)]
        page = jobs[offset:offset + limit]
        return page, (offset + limit if offset + limit < len(jobs) else 0)

    def cancel(self, job_id: str, reason: str) -> JobRecord:
        rec = self.get(job_id)
        if not rec.state.is_terminal():
            rec.state, rec.state_reason = JobState.CANCELLED, reason
        return rec

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        return JobFiles(self.artifacts, job_id).events(after)

    def set_state(self, job_id: str, state: JobState) -> None:
        self.jobs[job_id].state = state


_: type[JobRunner] = FakeRunner  # type-checks that the fake keeps the Protocol's shape


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP handler for fake OpenAI-compatible servers: subclasses answer with `send_json`."""

    def send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else {}

    def log_message(self, *args) -> None:
        pass


def serve_http(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """`handler` on 127.0.0.1:<free port> in a daemon thread; stop it with .shutdown()."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
