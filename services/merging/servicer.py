"""MergingService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

from services.core import convert
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration
from services.core.specs import parse
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import merging_pb2, merging_pb2_grpc
from services.merging.service import MergingService, MergingSettings
from services.merging.spec import MergeSpec

DTYPES = {pb.PRECISION_UNSPECIFIED: "auto", pb.PRECISION_FP32: "fp32", pb.PRECISION_BF16: "bf16",
          pb.PRECISION_FP16: "fp16"}


def spec_from_pb(s: merging_pb2.MergeSpec) -> MergeSpec:
    raw = {"base_model": convert.ref_from_pb(s.base_model).model_dump(),
           "adapter": convert.ref_from_pb(s.adapter).model_dump(), "name": s.name,
           "output_dtype": convert.enum_name(DTYPES, s.output_dtype, "spec.output_dtype")}
    for field in ("max_shard_bytes", "memory_budget_bytes", "num_probe_prompts"):
        if value := getattr(s, field):
            raw[field] = value
    return parse(MergeSpec, raw)


class MergingServicer(JobSurfaceServicer, merging_pb2_grpc.MergingServiceServicer):
    def __init__(self, service: MergingService):
        self.svc = service
        self.jobs = service.jobs

    async def SubmitMerge(self, request: merging_pb2.SubmitMergeRequest, context) -> pb.Job:
        job = await self.svc.submit(spec_from_pb(request.spec), convert.options_from_pb(request.options))
        return convert.job_to_pb(job)


def build(runtime: Runtime, settings: MergingSettings) -> Registration:
    service = MergingService(runtime.artifacts, runtime.runner, settings)
    return Registration(merging_pb2_grpc.add_MergingServiceServicer_to_server, MergingServicer(service),
                        "tunery.v1.MergingService")
