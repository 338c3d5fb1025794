"""ServingService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

import asyncio

from services.core import convert
from services.core.errors import InvalidArgument
from services.core.job_api import JobSurfaceServicer, page_size
from services.core.runtime import Runtime
from services.core.server import Registration
from services.core.specs import parse
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import serving_pb2, serving_pb2_grpc
from services.serving.service import ServingService, ServingSettings
from services.serving.spec import DeploymentRecord, DeploymentSpec, LoraModule

DTYPES = {pb.PRECISION_UNSPECIFIED: "auto", pb.PRECISION_FP32: "fp32", pb.PRECISION_BF16: "bf16",
          pb.PRECISION_FP16: "fp16"}
DTYPES_PB = {v: k for k, v in DTYPES.items()}
STATES = {"STARTING": serving_pb2.DEPLOYMENT_STATE_STARTING, "READY": serving_pb2.DEPLOYMENT_STATE_READY,
          "FAILED": serving_pb2.DEPLOYMENT_STATE_FAILED, "STOPPED": serving_pb2.DEPLOYMENT_STATE_STOPPED}
NUMBERS = ("replicas", "max_model_len", "gpu_memory_utilization", "kv_cache_bytes", "tensor_parallel_size",
           "max_loras", "max_lora_rank")


def module_from_pb(m: serving_pb2.LoraModule) -> dict:
    return {"name": m.name, "adapter": convert.ref_from_pb(m.adapter).model_dump()}


def spec_from_pb(s: serving_pb2.DeploymentSpec) -> DeploymentSpec:
    raw = {"name": s.name, "model": convert.ref_from_pb(s.model).model_dump(),
           "adapters": [module_from_pb(m) for m in s.adapters], "tool_call_parser": s.tool_call_parser,
           "dtype": convert.enum_name(DTYPES, s.dtype, "spec.dtype")}
    raw |= {f: getattr(s, f) for f in NUMBERS if getattr(s, f)}
    raw["scale_to_zero"] = s.scale_to_zero
    if s.idle_timeout_s:
        raw["idle_timeout_s"] = s.idle_timeout_s
    return parse(DeploymentSpec, raw)


def spec_to_pb(d: DeploymentSpec) -> serving_pb2.DeploymentSpec:
    out = serving_pb2.DeploymentSpec(
        name=d.name, model=convert.ref_to_pb(d.model), tool_call_parser=d.tool_call_parser, dtype=DTYPES_PB[d.dtype],
        adapters=[serving_pb2.LoraModule(name=a.name, adapter=convert.ref_to_pb(a.adapter)) for a in d.adapters],
        scale_to_zero=d.scale_to_zero, idle_timeout_s=d.idle_timeout_s, **{f: getattr(d, f) for f in NUMBERS})
    return out


def deployment_to_pb(r: DeploymentRecord, metrics: dict[str, float] | None = None) -> serving_pb2.Deployment:
    return serving_pb2.Deployment(
        name=r.name, spec=spec_to_pb(r.spec), state=STATES[r.state], base_url=r.base_url,
        served_models=r.spec.served_models(), job_id=r.job_id, api_key=r.api_key, message=r.message,
        metrics=serving_pb2.DeploymentMetrics(**(metrics or {})), created_at=r.created_at, updated_at=r.updated_at)


class ServingServicer(JobSurfaceServicer, serving_pb2_grpc.ServingServiceServicer):
    def __init__(self, service: ServingService):
        self.svc = service
        self.jobs = service.jobs

    async def CreateDeployment(self, request: serving_pb2.CreateDeploymentRequest, context) -> pb.Job:
        job = await self.svc.create(spec_from_pb(request.spec), convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def GetDeployment(self, request: serving_pb2.GetDeploymentRequest, context) -> serving_pb2.Deployment:
        record, metrics = await asyncio.to_thread(self.svc.get, request.name, True)
        return deployment_to_pb(record, metrics)

    async def ListDeployments(self, request: serving_pb2.ListDeploymentsRequest, context):
        records, after = await asyncio.to_thread(self.svc.list, page_size(request.page_size), request.page_token)
        return serving_pb2.ListDeploymentsResponse(deployments=[deployment_to_pb(r) for r in records],
                                                   next_page_token=after)

    async def DeleteDeployment(self, request: serving_pb2.DeleteDeploymentRequest, context):
        return deployment_to_pb(await self.svc.delete(request.name))

    async def AddAdapter(self, request: serving_pb2.AddAdapterRequest, context) -> pb.Job:
        if not request.HasField("adapter"):
            raise InvalidArgument.field("adapter", "is required: the name clients ask for and the adapter artifact")
        module = parse(LoraModule, module_from_pb(request.adapter))
        job = await self.svc.add_adapter(request.deployment, module, convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def RemoveAdapter(self, request: serving_pb2.RemoveAdapterRequest, context) -> pb.Job:
        job = await self.svc.remove_adapter(request.deployment, request.name, convert.options_from_pb(request.options))
        return convert.job_to_pb(job)


def build(runtime: Runtime, settings: ServingSettings) -> Registration:
    service = ServingService(runtime.artifacts, runtime.runner, settings)
    return Registration(serving_pb2_grpc.add_ServingServiceServicer_to_server, ServingServicer(service),
                        "tunery.v1.ServingService")
