"""QuantizationService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

import asyncio

from services.core import convert
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration
from services.core.specs import parse
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import quantization_pb2, quantization_pb2_grpc
from services.quantization.service import Plan, QuantizationService, QuantizationSettings
from services.quantization.spec import QuantizeSpec

SCHEMES = {quantization_pb2.QUANT_SCHEME_GPTQ_W4A16: "gptq-w4a16", quantization_pb2.QUANT_SCHEME_AWQ_W4A16: "awq-w4a16",
           quantization_pb2.QUANT_SCHEME_W8A8_INT8: "w8a8-int8", quantization_pb2.QUANT_SCHEME_FP8_DYNAMIC: "fp8-dynamic",
           quantization_pb2.QUANT_SCHEME_GGUF_Q4_K_M: "gguf-q4_k_m", quantization_pb2.QUANT_SCHEME_GGUF_Q8_0: "gguf-q8_0",
           quantization_pb2.QUANT_SCHEME_GGUF_F16: "gguf-f16"}
SCHEME_ENUMS = {v: k for k, v in SCHEMES.items()}


def spec_from_pb(s: quantization_pb2.QuantizeSpec) -> QuantizeSpec:
    raw = {"model": convert.ref_from_pb(s.model).model_dump(), "name": s.name, "ignore": list(s.ignore),
           "scheme": convert.enum_name({0: "", **SCHEMES}, s.scheme, "spec.scheme")}
    if s.calibration_dataset.uri:
        raw["calibration_dataset"] = convert.ref_from_pb(s.calibration_dataset).model_dump()
    for field in ("num_calibration_samples", "calibration_max_seq_len", "group_size", "memory_budget_bytes", "seed"):
        if value := getattr(s, field):
            raw[field] = value
    return parse(QuantizeSpec, raw)


def spec_to_pb(s: QuantizeSpec) -> quantization_pb2.QuantizeSpec:
    return quantization_pb2.QuantizeSpec(
        model=convert.ref_to_pb(s.model), scheme=SCHEME_ENUMS.get(s.scheme, 0),
        calibration_dataset=convert.ref_to_pb(s.calibration_dataset) if s.calibration_dataset else None,
        num_calibration_samples=s.num_calibration_samples, calibration_max_seq_len=s.calibration_max_seq_len,
        ignore=s.ignore, group_size=s.group_size, name=s.name, memory_budget_bytes=s.memory_budget_bytes, seed=s.seed)


def plan_to_pb(p: Plan) -> quantization_pb2.QuantizePlan:
    return quantization_pb2.QuantizePlan(
        spec=spec_to_pb(p.spec), ignore=p.spec.resolved_ignore, quantized_modules=p.quantized_modules,
        linear_modules=len(p.arch.linears), routers=p.arch.routers, peak_bytes=p.memory.peak,
        memory=p.memory.describe(), model_bytes=p.memory.model_bytes, output_bytes=p.output_bytes,
        largest_node_bytes=p.largest_node_bytes, calibration_source=p.spec.calibration_source, warnings=p.warnings)


class QuantizationServicer(JobSurfaceServicer, quantization_pb2_grpc.QuantizationServiceServicer):
    def __init__(self, service: QuantizationService):
        self.svc = service
        self.jobs = service.jobs

    async def SubmitQuantize(self, request: quantization_pb2.SubmitQuantizeRequest, context) -> pb.Job:
        job = await self.svc.submit(spec_from_pb(request.spec), convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def PlanQuantize(self, request: quantization_pb2.SubmitQuantizeRequest, context) -> quantization_pb2.QuantizePlan:
        return plan_to_pb(await asyncio.to_thread(self.svc.plan, spec_from_pb(request.spec)))


def build(runtime: Runtime, settings: QuantizationSettings) -> Registration:
    service = QuantizationService(runtime.artifacts, runtime.runner, settings)
    return Registration(quantization_pb2_grpc.add_QuantizationServiceServicer_to_server,
                        QuantizationServicer(service), "tunery.v1.QuantizationService")
