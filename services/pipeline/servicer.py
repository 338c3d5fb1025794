"""PipelineService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

from services.core import convert
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import pipeline_pb2, pipeline_pb2_grpc
from services.pipeline.service import PipelineService, PipelineSettings


class PipelineServicer(JobSurfaceServicer, pipeline_pb2_grpc.PipelineServiceServicer):
    def __init__(self, service: PipelineService):
        self.svc = service
        self.jobs = service.jobs

    async def SubmitPipeline(self, request: pipeline_pb2.SubmitPipelineRequest, context) -> pb.Job:
        job = await self.svc.submit(request.spec, convert.message_to_dict(request.spec), request.options.smoke,
                                    convert.options_from_pb(request.options))
        return convert.job_to_pb(job)


def build(runtime: Runtime, settings: PipelineSettings) -> Registration:
    service = PipelineService(runtime.runner, settings, lambda: runtime.endpoints, runtime.artifacts)
    return Registration(pipeline_pb2_grpc.add_PipelineServiceServicer_to_server, PipelineServicer(service),
                        "tunery.v1.PipelineService")
