"""Jobs: the domain model, the store-backed event log, and the runner interface with its Ray implementation.

A job's files in the store (below projects/<project>/jobs/<job-id>/):
    spec.json            the envelope: kind, service, role, the typed spec, its sha256 (written by the runner)
    events/<cursor>.json one event per object, cursor = 1, 2, 3, ... (written by the job only)
    state.json           phase, outputs, latest metrics, error (written by the job only)
    cancel.json          a cancel request (written by the service): Ray cannot stop a job still pending,
                         so the state is derived from it and a job that starts later exits at once
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from enum import Enum
from typing import Any, Protocol

from pydantic import BaseModel, Field

from services.core.artifacts import ArtifactRef, ArtifactStore
from services.core.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from services.core.keys import validate_id
from services.core.settings import RaySettings

log = logging.getLogger(__name__)


class JobState(str, Enum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Resources(BaseModel):
    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: int = 0
    accelerator_type: str = ""
    custom: dict[str, float] = Field(default_factory=dict)


class JobEvent(BaseModel):
    cursor: int
    job_id: str
    time: float
    level: str = "info"                    # debug | info | warning | error
    type: str = "message"                  # message | metrics | artifact
    text: str = ""
    step: int = 0
    total_steps: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact: ArtifactRef | None = None
    state: JobState | None = None


class JobEnvelope(BaseModel):
    """What the runner stores for a job and the job reads back: its single typed input plus identity."""

    job_id: str
    kind: str
    service: str
    role: str
    project: str
    spec: dict[str, Any]
    spec_sha256: str
    created_at: float
    labels: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)


class JobProgress(BaseModel):
    """state.json: what the job says about itself."""

    phase: str = ""                        # validating | running | done
    started_at: float = 0.0
    outputs: list[ArtifactRef] = Field(default_factory=list)
    latest_metrics: dict[str, float] = Field(default_factory=dict)
    last_cursor: int = 0
    error: str = ""


class JobRecord(BaseModel):
    id: str
    kind: str
    service: str
    state: JobState
    state_reason: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    spec: dict[str, Any] = Field(default_factory=dict)
    spec_sha256: str = ""
    resources: Resources = Field(default_factory=Resources)
    outputs: list[ArtifactRef] = Field(default_factory=list)
    latest_metrics: dict[str, float] = Field(default_factory=dict)
    last_event_cursor: int = 0
    labels: dict[str, str] = Field(default_factory=dict)


class JobRequest(BaseModel):
    kind: str
    service: str
    role: str = "control"
    spec: dict[str, Any]
    idempotency_key: str = ""
    resources: Resources = Field(default_factory=Resources)
    labels: dict[str, str] = Field(default_factory=dict)


def spec_sha256(kind: str, project: str, spec: dict[str, Any]) -> str:
    body = json.dumps({"kind": kind, "project": project, "spec": spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


class JobFiles:
    """The job's objects in the store, shared by the runner (service side) and JobContext (job side)."""

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


def derive_state(ray_status: str, ray_message: str, progress: JobProgress, cancel: str | None) -> tuple[JobState, str]:
    """Map Ray's job status plus what the job and the service wrote to (state, reason)."""
    if ray_status == "SUCCEEDED":
        return JobState.SUCCEEDED, ""
    if cancel is not None and ray_status in ("PENDING", "STOPPED", "FAILED"):
        return JobState.CANCELLED, cancel
    if ray_status == "STOPPED":
        return JobState.CANCELLED, ray_message or "stopped"
    if ray_status == "FAILED":
        return JobState.FAILED, progress.error or ray_message or "the job failed"
    if ray_status == "PENDING":
        return JobState.QUEUED, ray_message
    if ray_status == "RUNNING":
        if cancel is not None:
            return JobState.RUNNING, f"cancelling: {cancel}"
        if progress.phase == "validating":
            return JobState.VALIDATING, ""
        return JobState.RUNNING, ""
    return JobState.QUEUED, ray_message


def unschedulable_reason(want: Resources, nodes: list[dict[str, float]]) -> str:
    """Why no node can ever run a job asking for `want` (empty when some node could)."""
    if not nodes:
        return "no Ray nodes are up"
    need = {"CPU": want.cpus, "GPU": want.gpus, "memory": float(want.memory_bytes), **want.custom}
    if want.accelerator_type:
        need[f"accelerator_type:{want.accelerator_type}"] = 0.001
    need = {k: v for k, v in need.items() if v > 0}
    for node in nodes:
        if all(node.get(k, 0.0) >= v for k, v in need.items()):
            return ""
    short = []
    for k, v in need.items():
        best = max(n.get(k, 0.0) for n in nodes)
        if best < v:
            unit = (lambda x: f"{x / 2**30:.1f} GiB") if k == "memory" else (lambda x: f"{x:g}")
            short.append(f"asks for {unit(v)} {k}, the largest node has {unit(best)}")
    return "cannot be scheduled on the current cluster: " + "; ".join(short) + " (it stays queued until a node that fits joins, e.g. through the autoscaler)"


class JobRunner(Protocol):
    def ping(self) -> None: ...
    def submit(self, req: JobRequest) -> JobRecord: ...
    def get(self, job_id: str, *, with_spec: bool = True) -> JobRecord: ...
    def list(self, *, service: str = "", kind: str = "", states: set[JobState] | None = None,
             offset: int = 0, limit: int = 50) -> tuple[list[JobRecord], int]: ...
    def cancel(self, job_id: str, reason: str) -> JobRecord: ...
    def events(self, job_id: str, after: int = 0) -> list[JobEvent]: ...
    def nodes(self) -> list[dict[str, float]]: ...


class RayJobRunner:
    """Jobs as Ray jobs through ray.job_submission.JobSubmissionClient (the dashboard's job API)."""

    NODES_TTL_S = 10.0

    def __init__(self, settings: RaySettings, artifacts: ArtifactStore, job_env: dict[str, str]):
        self.settings = settings
        self.artifacts = artifacts
        self.job_env = job_env
        self._client_obj = None
        self._lock = threading.Lock()
        self._nodes: tuple[float, list[dict[str, float]]] = (0.0, [])

    # ------------------------------------------------------------------ plumbing
    def _client(self):
        with self._lock:
            if self._client_obj is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client_obj = JobSubmissionClient(self.settings.ray_address)
                except Exception as e:
                    raise Unavailable(f"Ray job API at {self.settings.ray_address} is not answering: {e}") from e
            return self._client_obj

    def ping(self) -> None:
        import requests

        try:
            requests.get(self.settings.ray_address.rstrip("/") + "/api/version", timeout=3).raise_for_status()
        except Exception as e:
            raise Unavailable(f"Ray job API at {self.settings.ray_address} is not answering: {e}") from e
        self._client()

    def _info(self, job_id: str):
        try:
            return self._client().get_job_info(job_id)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return None
            raise Unavailable(f"Ray job API error: {e}") from e

    def nodes(self) -> list[dict[str, float]]:
        """Each live node's total resources as Ray reports them (CPU, GPU, memory, accelerator_type:X), cached."""
        at, nodes = self._nodes
        if time.monotonic() - at < self.NODES_TTL_S:
            return nodes
        from ray.util.state import list_nodes

        try:
            live = [n for n in list_nodes(address=self.settings.ray_address, detail=True) if n.state == "ALIVE"]
            nodes = [dict(n.resources_total) for n in live]
        except Exception as e:  # the reason is a courtesy; never fail a Get for it
            log.warning("could not list Ray nodes: %s", e)
        self._nodes = (time.monotonic(), nodes)
        return nodes

    def _mine(self, info) -> bool:
        return bool(info.submission_id) and (info.metadata or {}).get("tunery_project") == self.artifacts.project

    def _record(self, info, *, with_spec: bool) -> JobRecord:
        files = JobFiles(self.artifacts, info.submission_id)
        meta = info.metadata or {}
        progress = files.progress()
        state, reason = derive_state(str(info.status.value if hasattr(info.status, "value") else info.status),
                                     info.message or "", progress, files.cancel_reason())
        env = files.envelope() if with_spec else None
        resources = env.resources if env else Resources.model_validate_json(meta.get("tunery_resources", "{}"))
        if state is JobState.QUEUED:
            why = unschedulable_reason(resources, self.nodes())
            reason = why or "waiting for free resources (" + _fmt_resources(resources) + ")"
        return JobRecord(
            id=info.submission_id,
            kind=meta.get("tunery_kind", ""),
            service=meta.get("tunery_service", ""),
            state=state,
            state_reason=reason,
            created_at=(info.start_time or 0) / 1000.0,
            started_at=progress.started_at,
            finished_at=(info.end_time or 0) / 1000.0 if state.is_terminal() else 0.0,
            spec=env.spec if env else {},
            spec_sha256=meta.get("tunery_spec_sha256", ""),
            resources=resources,
            outputs=progress.outputs,
            latest_metrics=progress.latest_metrics,
            last_event_cursor=progress.last_cursor,
            labels=json.loads(meta.get("tunery_labels", "{}")),
        )

    # ------------------------------------------------------------------ API
    def submit(self, req: JobRequest) -> JobRecord:
        project = self.artifacts.project
        job_id = validate_id(req.idempotency_key, "idempotency_key") if req.idempotency_key else (
            f"{req.service}-{uuid.uuid4().hex[:12]}"
        )
        digest = spec_sha256(req.kind, project, req.spec)
        existing = self._info(job_id) if req.idempotency_key else None
        if existing is not None:
            return self._same_or_conflict(existing, job_id, digest)
        files = JobFiles(self.artifacts, job_id)
        files.put_envelope(JobEnvelope(
            job_id=job_id, kind=req.kind, service=req.service, role=req.role, project=project,
            spec=req.spec, spec_sha256=digest, created_at=time.time(), labels=req.labels, resources=req.resources,
        ))
        r = req.resources
        entry_resources = dict(r.custom)
        if self.settings.role_resources:
            entry_resources[f"tunery_{req.role}"] = 1.0
        if r.accelerator_type:
            entry_resources[f"accelerator_type:{r.accelerator_type}"] = 0.001
        python = self.settings.python_for(req.role)
        try:
            self._client().submit_job(
                entrypoint=f"{python} -m services.{req.service}.job {files.spec_uri}",
                submission_id=job_id,
                entrypoint_num_cpus=r.cpus,
                entrypoint_num_gpus=r.gpus,
                entrypoint_memory=r.memory_bytes or None,
                entrypoint_resources=entry_resources or None,
                runtime_env={"env_vars": {**self.job_env, "TUNERY_JOB_ID": job_id,
                                          # read by Ray's job supervisor: SIGTERM, then this long before SIGKILL
                                          "RAY_JOB_STOP_WAIT_TIME_S": str(self.settings.job_stop_grace_s)}},
                metadata={
                    "tunery_project": project,
                    "tunery_service": req.service,
                    "tunery_kind": req.kind,
                    "tunery_spec_sha256": digest,
                    "tunery_labels": json.dumps(req.labels),
                    "tunery_resources": r.model_dump_json(),
                },
            )
        except RuntimeError as e:
            raced = self._info(job_id)
            if raced is not None:  # the same key submitted concurrently
                return self._same_or_conflict(raced, job_id, digest)
            raise Unavailable(f"Ray refused the job: {e}") from e
        info = self._info(job_id)
        if info is None:
            raise Unavailable(f"Ray accepted job {job_id} but does not know it")
        return self._record(info, with_spec=True)

    def _same_or_conflict(self, info, job_id: str, digest: str) -> JobRecord:
        theirs = (info.metadata or {}).get("tunery_spec_sha256", "")
        if not self._mine(info) or theirs != digest:
            raise AlreadyExists(
                f"idempotency key {job_id!r} is already used by a job with a different spec "
                f"(sha256 {theirs[:12] or 'unknown'}… vs this request's {digest[:12]}…); use a new key"
            )
        return self._record(info, with_spec=True)

    def get(self, job_id: str, *, with_spec: bool = True) -> JobRecord:
        validate_id(job_id, "job_id")
        info = self._info(job_id)
        if info is None or not self._mine(info):
            raise NotFound(f"job {job_id} not found in project {self.artifacts.project}")
        return self._record(info, with_spec=with_spec)

    def list(self, *, service: str = "", kind: str = "", states: set[JobState] | None = None,
             offset: int = 0, limit: int = 50) -> tuple[list[JobRecord], int]:
        infos = [i for i in self._client().list_jobs() if self._mine(i)]
        if service:
            infos = [i for i in infos if (i.metadata or {}).get("tunery_service") == service]
        if kind:
            infos = [i for i in infos if (i.metadata or {}).get("tunery_kind") == kind]
        infos.sort(key=lambda i: (-(i.start_time or 0), i.submission_id))
        out: list[JobRecord] = []
        pos = offset
        for info in infos[offset:]:
            pos += 1
            rec = self._record(info, with_spec=False)
            if states and rec.state not in states:
                continue
            out.append(rec)
            if len(out) == limit:
                return out, (pos if pos < len(infos) else 0)
        return out, 0

    def cancel(self, job_id: str, reason: str) -> JobRecord:
        rec = self.get(job_id, with_spec=False)
        if rec.state.is_terminal():
            return rec
        JobFiles(self.artifacts, job_id).request_cancel(reason or "cancelled by request")
        try:
            self._client().stop_job(job_id)
        except RuntimeError as e:
            log.warning("stop_job(%s): %s", job_id, e)
        return self.get(job_id)

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        return JobFiles(self.artifacts, validate_id(job_id, "job_id")).events(after)


def _fmt_resources(r: Resources) -> str:
    parts = [f"{r.cpus:g} CPU"]
    if r.gpus:
        parts.append(f"{r.gpus:g} GPU")
    if r.memory_bytes:
        parts.append(f"{r.memory_bytes / 2**30:.1f} GiB memory")
    parts += [f"{v:g} {k}" for k, v in r.custom.items()]
    return ", ".join(parts)


def check_resources(r: Resources) -> None:
    if r.cpus < 0 or r.gpus < 0 or r.memory_bytes < 0:
        raise InvalidArgument.field("options.resources", "cpus, gpus and memory_bytes must be ≥ 0")
