"""A job's objects in the store, shared by the runner (service side) and JobContext (job side).

Below projects/<project>/jobs/<job-id>/:
    spec.json            the envelope: kind, service, role, the typed spec, its sha256 (written by the runner)
    events/<cursor>.json one event per object, cursor = 1, 2, 3, ... (written by the job only)
    state.json           phase, outputs, latest metrics, error (written by the job only)
    cancel.json          a cancel request (written by the service): Ray cannot stop a job still pending,
                         so the state is derived from it and a job that starts later exits at once
"""

from __future__ import annotations

import json
import time

from services.core.artifacts import ArtifactStore
from services.core.errors import NotFound
from services.core.jobs import JobEnvelope, JobEvent, JobProgress
from services.core.keys import validate_id


class JobFiles:
    def __init__(self, artifacts: ArtifactStore, job_id: str):
        self.store = artifacts.objects
        self.job_id = validate_id(job_id, "job_id")
        self.base = artifacts.key("jobs", self.job_id)

    def key(self, name: str) -> str:
        return f"{self.base}/{name}"

    @property
    def spec_uri(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.key('spec.json')}"

    def _get(self, name: str, model):
        try:
            return model.model_validate_json(self.store.get_bytes(self.key(name)))
        except NotFound:
            return None

    def envelope(self) -> JobEnvelope | None:
        return self._get("spec.json", JobEnvelope)

    def put_envelope(self, env: JobEnvelope) -> None:
        self.store.put_bytes(self.key("spec.json"), env.model_dump_json().encode())

    def progress(self) -> JobProgress:
        return self._get("state.json", JobProgress) or JobProgress()

    def put_progress(self, p: JobProgress) -> None:
        self.store.put_bytes(self.key("state.json"), p.model_dump_json().encode())

    def cancel_reason(self) -> str | None:
        try:
            raw = self.store.get_bytes(self.key("cancel.json"))
        except NotFound:
            return None
        return json.loads(raw).get("reason") or "cancelled by request"

    def request_cancel(self, reason: str) -> None:
        self.store.put_bytes(self.key("cancel.json"), json.dumps({"reason": reason, "at": time.time()}).encode())

    def append_event(self, event: JobEvent) -> None:
        self.store.put_bytes(self.key(f"events/{event.cursor:012d}.json"), event.model_dump_json().encode())

    def events(self, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        prefix = self.key("events/")
        start = self.key(f"events/{after:012d}.json") if after > 0 else ""
        out = []
        for key in self.store.list(prefix, start):
            out.append(JobEvent.model_validate_json(self.store.get_bytes(key)))
            if len(out) >= limit:
                break
        return out
