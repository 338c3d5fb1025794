"""Services whose own RPCs are not implemented yet: they answer UNIMPLEMENTED with a sentence naming the issue that
brings them, while the shared job surface already works. This module goes away when the last service lands."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from services.core.errors import Unimplemented
from services.core.job_api import JobService, JobSurfaceServicer
from services.core.runtime import Builder, Runtime
from services.core.server import Registration
from services.core.settings import ServiceSettings


def planned(base: type, issue: str, keep: Sequence[str] = ()) -> type:
    """A servicer class whose RPCs (other than `keep` and the job surface) answer UNIMPLEMENTED with a sentence
    naming the issue that will implement them."""
    job_rpcs = {"GetJob", "ListJobs", "CancelJob", "WatchJob"}
    label = base.__name__.removesuffix("Servicer")
    attrs = {}
    for name, fn in inspect.getmembers(base, inspect.isfunction):
        if name.startswith("_") or name in job_rpcs or name in keep:
            continue

        def make(rpc: str):
            async def not_yet(self, request, context):
                raise Unimplemented(f"{label}.{rpc} is not implemented yet: it arrives with {issue}.")
            return not_yet

        attrs[name] = make(name)
    return type(f"Planned{base.__name__}", (base,), attrs)


def planned_build(base: type, add: Callable, full_name: str, service: str, issue: str) -> Builder:
    """The builder of a service whose own RPCs are not implemented yet: they answer UNIMPLEMENTED naming the
    issue that brings them, while the shared job surface already works."""
    servicer_cls = type(f"{base.__name__}Impl", (JobSurfaceServicer, planned(base, issue)), {})

    def build(runtime: Runtime, settings: ServiceSettings) -> Registration:
        servicer = servicer_cls()
        servicer.jobs = JobService(runtime.runner, service)
        return Registration(add, servicer, full_name)

    return build
