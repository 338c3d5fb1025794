"""Pipeline service logic and settings: check a whole PipelineSpec, name the pipeline, queue the one control-role
job that drives the stage services (services.pipeline.job). No grpc.

A pipeline's id is the idempotency key when one is given, else `<name>[-smoke]-<sha256 of the spec, 10 hex>`: the
same file submitted again is the same pipeline. Its attempts are jobs `<id>`, `<id>-r2`, ...: while one runs (or
once one succeeded) the same request returns it; after one failed or was cancelled the next attempt starts, and its
stages re-attach to the stage jobs that already ran (their keys are `<id>-<stage>`), so nothing is done twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from pydantic import Field

from services.core.artifacts import ArtifactStore
from services.core.errors import FailedPrecondition, FieldViolation, NotFound, PermissionDenied, check
from services.core.hostpaths import host_path
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, JobState, Resources, SubmitOptions
from services.core.settings import ServiceSettings, default_endpoints, port_field
from services.core.uploads import SCHEME as UPLOAD, Uploads
from services.pipeline.spec import URL, PipelineJobSpec, check_id, spec_problems
from services.gen.tunery.v1 import pipeline_pb2

ENDED_BADLY = (JobState.FAILED, JobState.CANCELLED)
MAX_ATTEMPTS = 50


class PipelineSettings(ServiceSettings):
    service: str = "pipeline"
    port: int = port_field("pipeline")
    endpoints: dict[str, str] = Field(default_factory=dict, description="where the stage services answer "
                                      "({service: host:port}), for the pipeline job; unset: this process's own (the "
                                      "embedded stack), else TUNERY_<SERVICE>_ADDR, else 127.0.0.1:<default port>")
    pipeline_cpus: float = Field(0.0, ge=0, description="CPUs the pipeline job asks Ray for: none by default, it "
                                 "only waits on the stage jobs, which ask for their own (a share would keep a stage "
                                 "that asks for every CPU from ever starting)")


def pipeline_id(spec: dict, smoke: bool) -> str:
    """`<name>[-smoke]-<10 hex>` of the spec without `force` (nor the client paths of uploads): a forced re-run of a pipeline whose gates failed is the
    next attempt of the same pipeline, and re-attaches to the stages that ran."""
    def plain(v):  # where a file was uploaded from is not what the pipeline is
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items() if k not in ("force", "uploaded_from")}
        return [plain(x) for x in v] if isinstance(v, list) else v

    body = plain(spec)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    return f"{spec.get('name') or 'pipeline'}{'-smoke' if smoke else ''}-{digest}"


class PipelineService:
    SERVICE = "pipeline"

    def __init__(self, runner: JobRunner, settings: PipelineSettings,
                 endpoints: Callable[[], dict[str, str]] = dict, artifacts: ArtifactStore | None = None):
        self.runner, self.settings, self._endpoints = runner, settings, endpoints
        self.jobs = JobService(runner, self.SERVICE)
        self.uploads = Uploads(artifacts) if artifacts is not None else None

    def endpoints(self) -> dict[str, str]:
        return {**default_endpoints(), **self._endpoints(), **self.settings.endpoints}

    def check(self, spec: pipeline_pb2.PipelineSpec) -> None:
        problems = spec_problems(spec)
        local = [("spec.base.source", spec.base.source), ("spec.data.source", spec.data.source),
                 ("spec.fact_probes.source", spec.fact_probes.source)]
        local += [(f"spec.train_extra[{i}].source", d.source) for i, d in enumerate(spec.train_extra)]
        for field, source in local:
            try:  # every problem at once, as the file loader reports them
                if source.startswith(UPLOAD) and self.uploads is not None:
                    self.uploads.listing(source, field)
                elif source and not URL.match(source):
                    host_path(source, field, roots=self.settings.roots(),
                              hint=" (`tunery pipeline run` uploads the file's local paths)")
            except PermissionDenied:
                raise
            except Exception as e:
                problems.append(FieldViolation(field, str(e).split(": ", 1)[-1]))
        check(problems)

    async def submit(self, spec: pipeline_pb2.PipelineSpec, spec_dict: dict, smoke: bool,
                     options: SubmitOptions) -> JobRecord:
        pid = check_id(options.key) if options.key else pipeline_id(spec_dict, smoke)
        self.check(spec)
        job = PipelineJobSpec(pipeline_id=pid, spec=spec_dict, smoke=smoke, endpoints=self.endpoints(),
                              token_file=str(self.settings.token_file or ""))
        labels = {"pipeline": pid, **({"smoke": "true"} if smoke else {}), **options.labels}
        for attempt in range(1, MAX_ATTEMPTS + 1):
            key = pid if attempt == 1 else f"{pid}-r{attempt}"
            try:
                existing = await self.jobs.get(key, with_spec=False)
            except NotFound:
                existing = None
            if existing is not None and existing.state in ENDED_BADLY:
                continue  # that attempt ended: the next one re-attaches to its stages
            return await self.jobs.submit(
                "pipeline.run", "control", lambda: job,
                options.model_copy(update={"key": key, "labels": labels}),
                Resources(cpus=self.settings.pipeline_cpus))
        raise FailedPrecondition(f"pipeline {pid} has ended badly {MAX_ATTEMPTS} times: read the last attempt's "
                                 "events, fix the cause and submit with a new options.idempotency_key")

    async def attempts(self, pid: str) -> list[JobRecord]:
        """Every attempt of a pipeline, first to last."""
        found = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                found.append(await self.jobs.get(pid if attempt == 1 else f"{pid}-r{attempt}", with_spec=False))
            except NotFound:
                break
        return found
