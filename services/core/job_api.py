"""The job surface every job-running service shares: submit (the one path from a validated spec to a queued job),
GetJob, ListJobs, CancelJob, WatchJob.

JobService holds the logic (no grpc); JobSurfaceServicer is the mixin a servicer inherits to expose it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pydantic import BaseModel

from services.core import convert
from services.core.errors import InvalidArgument
from services.core.jobs import (
    JobEvent,
    JobRecord,
    JobRequest,
    JobRunner,
    JobState,
    Resources,
    SubmitOptions,
    check_resources,
)
from services.core.keys import validate_id
from services.core.logs import job_id_var
from services.gen.tunery.v1 import common_pb2 as pb

MAX_PAGE = 500
S = TypeVar("S", bound=BaseModel)


def encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode() if offset else ""


def decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "o":
            raise ValueError
        return int(value)
    except Exception:
        raise InvalidArgument.field("page_token", "is not a token this service issued; start again without it") from None


def page_size(n: int) -> int:
    if n < 0:
        raise InvalidArgument.field("page_size", "must be ≥ 0")
    return min(n or 50, MAX_PAGE)


class JobService:
    """Logic for the shared job RPCs over any JobRunner."""

    POLL_MIN_S, POLL_MAX_S = 0.2, 1.0

    def __init__(self, runner: JobRunner, service: str):
        self.runner, self.service = runner, service

    async def submit(self, kind: str, role: str, validate: Callable[[], S], options: SubmitOptions,
                     resources: Resources | Callable[[S], Resources]) -> JobRecord:
        """The one way a service queues a job: the options are checked, `validate` (the service's checks, run in a
        thread: they read the store) returns the job's typed spec, and the job goes to the runner with the
        caller's resources or the service's default `resources` (or the default for the validated spec). Nothing is
        written before every check passed."""
        if options.key:
            validate_id(options.key, "options.idempotency_key")
        if options.resources is not None:
            check_resources(options.resources)
        spec = await asyncio.to_thread(validate)
        chosen = options.resources or (resources(spec) if callable(resources) else resources)
        return await asyncio.to_thread(self.runner.submit, JobRequest(
            kind=kind, service=self.service, role=role, spec=spec.model_dump(mode="json"),
            idempotency_key=options.key, resources=chosen, labels=options.labels))

    async def get(self, job_id: str, *, with_spec: bool = True) -> JobRecord:
        job_id_var.set(job_id)
        return await asyncio.to_thread(self.runner.get, validate_id(job_id, "job_id"), with_spec=with_spec)

    async def list(self, *, kind: str, states: set[JobState], page_size_: int, token: str,
                   all_services: bool = False) -> tuple[list[JobRecord], str]:
        jobs, nxt = await asyncio.to_thread(
            self.runner.list, service="" if all_services else self.service, kind=kind, states=states,
            offset=decode_token(token), limit=page_size(page_size_))
        return jobs, encode_token(nxt)

    async def cancel(self, job_id: str, reason: str) -> JobRecord:
        job_id_var.set(job_id)
        return await asyncio.to_thread(self.runner.cancel, validate_id(job_id, "job_id"), reason)

    async def watch(self, job_id: str, after: int, follow: bool = True) -> AsyncIterator[JobEvent]:
        """Every event after `after`, then (when following) one closing event once the job has ended."""
        job_id_var.set(job_id)
        if after < 0:
            raise InvalidArgument.field("after_cursor", "must be ≥ 0")
        # state only: the poll below runs every 0.2-1 s and has no use for the spec (one store read fewer)
        rec = await self.get(job_id, with_spec=False)  # NOT_FOUND before streaming anything
        cursor, delay = after, self.POLL_MIN_S
        while True:
            terminal = rec.state.is_terminal()
            events = await asyncio.to_thread(self.runner.events, job_id, cursor)
            for ev in events:
                cursor = ev.cursor
                yield ev
            if not follow:
                return
            if terminal and not events:
                yield JobEvent(cursor=cursor, job_id=job_id, time=time.time(),
                               level="error" if rec.state is JobState.FAILED else "info",
                               text=f"job {rec.state.value}" + (f": {rec.state_reason}" if rec.state_reason else ""),
                               state=rec.state)
                return
            delay = self.POLL_MIN_S if events else min(delay * 1.5, self.POLL_MAX_S)
            await asyncio.sleep(delay)
            rec = await self.get(job_id, with_spec=False)


class JobSurfaceServicer:
    """Mixin: a servicer with a `jobs: JobService` attribute gets the four shared job RPCs."""

    jobs: JobService

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return convert.job_to_pb(await self.jobs.get(request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs, token = await self.jobs.list(
            kind=request.kind, states={convert.PB_TO_STATE[s] for s in request.states if s in convert.PB_TO_STATE},
            page_size_=request.page_size, token=request.page_token, all_services=request.all_services)
        return pb.ListJobsResponse(jobs=[convert.job_to_pb(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return convert.job_to_pb(await self.jobs.cancel(request.job_id, request.reason))

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        async for ev in self.jobs.watch(request.job_id, request.after_cursor, follow=not request.no_follow):
            yield convert.event_to_pb(ev)
