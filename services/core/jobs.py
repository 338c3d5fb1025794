"""Jobs: the domain model (states, resources, events, records) and the runner interface.

Compare Ray's dashboard/modules/job/common.py. The job's objects in the store are services.core.job_store; the
runner on Ray is services.core.ray_jobs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from enum import Enum
from typing import Any, Protocol

from pydantic import BaseModel, Field

from services.core.artifacts import ArtifactRef
from services.core.errors import FieldViolation, check


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
    state: str = ""                        # the terminal state the job recorded (succeeded | failed | cancelled)
    last_step: int = 0                     # the step of its latest event that had one


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


class SubmitOptions(BaseModel):
    """What every Submit* request carries besides its spec (SubmitOptions in common.proto)."""

    key: str = ""                          # the idempotency key; it becomes the job id
    resources: Resources | None = None     # None: the service's default for the job
    labels: dict[str, str] = Field(default_factory=dict)


def spec_sha256(kind: str, project: str, spec: dict[str, Any]) -> str:
    body = json.dumps({"kind": kind, "project": project, "spec": spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


SIGNALS = {9: "SIGKILL: out of memory, or killed from outside", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV: a crash "
           "in native code", 7: "SIGBUS"}
CLUSTER_GONE = "the Ray cluster that ran it is gone (restarted?)"


def resume_hint(progress: JobProgress) -> str:
    """What submitting the same spec again does, from the job's own outputs: its latest checkpoint, if any."""
    ckpt = [o.uri for o in progress.outputs if "/checkpoint-" in o.uri]
    return (f"; the same spec submitted again resumes from {ckpt[-1].rsplit('/', 1)[-1]}" if ckpt else "")


def killed_reason(ray_message: str, progress: JobProgress) -> str:
    """Ray's 'Job entrypoint command failed with exit code 137, last available logs ...' as a person reads it:
    the signal, the step it reached, and how to resume; "" when the process exited on its own."""
    m = re.search(r"exit code (-?\d+)", ray_message or "")
    if not m:
        return ""
    code = int(m.group(1))
    signum = -code if code < 0 else code - 128 if code > 128 else 0
    if not signum:
        return ""
    at = f" at step {progress.last_step}" if progress.last_step else ""
    return (f"the job process was killed (signal {signum}: {SIGNALS.get(signum, 'a signal')}){at}"
            + resume_hint(progress))


def derive_state(ray_status: str, ray_message: str, progress: JobProgress, cancel: str | None) -> tuple[JobState, str]:
    """Map Ray's job status plus what the job and the service wrote to (state, reason)."""
    if ray_status == "SUCCEEDED":
        return JobState.SUCCEEDED, ""
    if cancel is not None and ray_status in ("PENDING", "STOPPED", "FAILED"):
        return JobState.CANCELLED, cancel
    if ray_status == "STOPPED":
        return JobState.CANCELLED, ray_message or "stopped"
    if ray_status == "FAILED":
        return JobState.FAILED, progress.error or killed_reason(ray_message, progress) or ray_message or \
            "the job failed"
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


def describe_resources(r: Resources) -> str:
    parts = [f"{r.cpus:g} CPU"]
    if r.gpus:
        parts.append(f"{r.gpus:g} GPU")
    if r.memory_bytes:
        parts.append(f"{r.memory_bytes / 2**30:.1f} GiB memory")
    parts += [f"{v:g} {k}" for k, v in r.custom.items()]
    return ", ".join(parts)


# Ray's own resource names: a custom resource may not shadow them
RAY_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
MAX_UNITS = 100_000.0          # CPUs, GPUs or units of a custom resource one job may ask for
MAX_MEMORY_BYTES = 1 << 50     # 1 PiB


def check_resources(r: Resources) -> None:
    """What a job may ask Ray for: finite, ≥ 0, not absurd; custom names that are not Ray's own. Checked before
    anything is written (a NaN once reached the store before it failed)."""
    problems = []
    for name, value in (("cpus", r.cpus), ("gpus", r.gpus)):
        if not math.isfinite(value) or not 0 <= value <= MAX_UNITS:
            problems.append(FieldViolation(f"options.resources.{name}", f"must be a number from 0 to {MAX_UNITS:g} "
                                           f"(got {value})"))
    if not 0 <= r.memory_bytes <= MAX_MEMORY_BYTES:
        problems.append(FieldViolation("options.resources.memory_bytes", f"must be from 0 to {MAX_MEMORY_BYTES} "
                                       f"(1 PiB; got {r.memory_bytes})"))
    for name, value in r.custom.items():
        where = f"options.resources.custom[{name[:64]!r}]"
        if name in RAY_RESOURCES or name.startswith("accelerator_type:"):
            problems.append(FieldViolation(where, "is one of Ray's own resources; use cpus, gpus, memory_bytes or "
                                           "accelerator_type"))
        elif not name or len(name) > 128 or not name.isprintable():
            problems.append(FieldViolation(where, "a custom resource name is 1-128 printable characters"))
        if not math.isfinite(value) or not 0 <= value <= MAX_UNITS:
            problems.append(FieldViolation(where, f"must be a number from 0 to {MAX_UNITS:g} (got {value})"))
    check(problems)


class JobRunner(Protocol):
    def ping(self) -> None: ...
    def submit(self, req: JobRequest) -> JobRecord: ...
    def get(self, job_id: str, *, with_spec: bool = True) -> JobRecord: ...
    def list(self, *, service: str = "", kind: str = "", states: set[JobState] | None = None,
             offset: int = 0, limit: int = 50) -> tuple[list[JobRecord], int]: ...
    def cancel(self, job_id: str, reason: str) -> JobRecord: ...
    def events(self, job_id: str, after: int = 0) -> list[JobEvent]: ...
    def nodes(self) -> list[dict[str, float]]: ...
