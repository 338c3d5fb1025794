"""The job runner on Ray: jobs as Ray jobs through ray.job_submission.JobSubmissionClient (the dashboard's job
API). Compare Ray's dashboard/modules/job/job_manager.py; the domain model is services.core.jobs."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from services.core.artifacts import ArtifactRef, ArtifactStore
from services.core.errors import AlreadyExists, NotFound, Unavailable
from services.core.job_store import JobFiles
from services.core.jobs import (
    CLUSTER_GONE,
    JobEnvelope,
    JobEvent,
    JobRecord,
    JobRequest,
    JobState,
    Resources,
    derive_state,
    describe_resources,
    resume_hint,
    spec_sha256,
    unschedulable_reason,
)
from services.core.keys import validate_id
from services.core.settings import RaySettings

log = logging.getLogger(__name__)


class RayJobRunner:
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
            reason = why or "waiting for free resources (" + describe_resources(resources) + ")"
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
            outputs=self._existing(progress.outputs),
            latest_metrics=progress.latest_metrics,
            last_event_cursor=progress.last_cursor,
            labels=json.loads(meta.get("tunery_labels", "{}")),
        )

    def _existing(self, outputs: list[ArtifactRef]) -> list[ArtifactRef]:
        """A job's outputs that still exist (a training job's pruned checkpoints, a deleted artifact: not listed)."""
        return [o for o in outputs if self.artifacts.find(o.uri) is not None]

    def _stored(self, job_id: str, with_spec: bool = True) -> JobRecord | None:
        """A job the Ray cluster does not know (it restarted, or this is another head), from what the store holds:
        the envelope, the job's own state.json and events. A job that never recorded an end ran on a cluster that
        is gone: failed, with that reason."""
        files = JobFiles(self.artifacts, job_id)
        env = files.envelope()
        if env is None or env.project != self.artifacts.project:
            return None
        progress = files.progress()
        cancel = files.cancel_reason()
        if progress.state in {s.value for s in JobState if s.is_terminal()}:
            state = JobState(progress.state)
            reason = progress.error if state is JobState.FAILED else (cancel or "") if state is JobState.CANCELLED \
                else ""
        elif cancel is not None and not progress.started_at:
            state, reason = JobState.CANCELLED, cancel
        else:
            state = JobState.FAILED
            at = f" at step {progress.last_step}" if progress.last_step else ""
            reason = f"{CLUSTER_GONE}: it was {progress.phase or 'queued'}{at} when it stopped reporting" + \
                resume_hint(progress.model_copy(update={"outputs": self._existing(progress.outputs)}))
        events = files.events(max(progress.last_cursor - 1, 0), limit=1) if progress.last_cursor else []
        return JobRecord(
            id=job_id, kind=env.kind, service=env.service, state=state, state_reason=reason,
            created_at=env.created_at, started_at=progress.started_at,
            finished_at=events[-1].time if events and state.is_terminal() else 0.0,
            spec=env.spec if with_spec else {}, spec_sha256=env.spec_sha256, resources=env.resources,
            outputs=self._existing(progress.outputs), latest_metrics=progress.latest_metrics,
            last_event_cursor=progress.last_cursor, labels=env.labels)

    def _stored_ids(self) -> list[str]:
        prefix = self.artifacts.key("jobs") + "/"
        return [k[len(prefix):-len("/spec.json")] for k in self.artifacts.objects.list(prefix)
                if k.endswith("/spec.json") and k.count("/") == prefix.count("/") + 1]

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
        if info is not None and self._mine(info):
            return self._record(info, with_spec=with_spec)
        stored = self._stored(job_id, with_spec) if info is None else None
        if stored is None:
            raise NotFound(f"job {job_id} not found in project {self.artifacts.project}")
        return stored

    def list(self, *, service: str = "", kind: str = "", states: set[JobState] | None = None,
             offset: int = 0, limit: int = 50) -> tuple[list[JobRecord], int]:
        """Every job of the project, newest first: Ray's (the live source while they run) and those only the store
        still holds (from before a restart of the cluster)."""
        ray_infos = [i for i in self._client().list_jobs() if self._mine(i)]
        known = {i.submission_id for i in ray_infos}
        entries: list[tuple[float, str, Any]] = [((i.start_time or 0) / 1000.0, i.submission_id, i) for i in ray_infos]
        for job_id in self._stored_ids():
            if job_id not in known:
                entries.append((0.0, job_id, None))
        out: list[JobRecord] = []
        stored: dict[str, JobRecord] = {}
        for i, (at, job_id, info) in enumerate(entries):
            if info is None and (rec := self._stored(job_id, with_spec=False)) is not None:
                stored[job_id] = rec
                entries[i] = (rec.created_at, job_id, None)
        entries = [e for e in entries if e[2] is not None or e[1] in stored]
        def meta(e, key: str) -> str:
            return (e[2].metadata or {}).get(f"tunery_{key}", "") if e[2] is not None else getattr(stored[e[1]], key)

        if service:
            entries = [e for e in entries if meta(e, "service") == service]
        if kind:
            entries = [e for e in entries if meta(e, "kind") == kind]
        entries.sort(key=lambda e: (-e[0], e[1]))
        pos = offset
        for at, job_id, info in entries[offset:]:
            pos += 1
            rec = self._record(info, with_spec=False) if info is not None else stored[job_id]
            if states and rec.state not in states:
                continue
            out.append(rec)
            if len(out) == limit:
                return out, (pos if pos < len(entries) else 0)
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
