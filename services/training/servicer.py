"""TrainingService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

from typing import Any

from services.core import convert
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration
from services.core.specs import parse
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import training_pb2, training_pb2_grpc
from services.training.service import Plan, TrainingService, TrainingSettings
from services.training.spec import TrainingJobSpec

METHODS = {training_pb2.FINETUNE_METHOD_LORA: "lora", training_pb2.FINETUNE_METHOD_QLORA: "qlora",
           training_pb2.FINETUNE_METHOD_DORA: "dora"}
PRESETS = {training_pb2.TARGET_MODULES_PRESET_ATTENTION: "attention",
           training_pb2.TARGET_MODULES_PRESET_ALL_LINEAR: "all-linear"}
PRECISIONS = {pb.PRECISION_FP32: "fp32", pb.PRECISION_BF16: "bf16", pb.PRECISION_FP16: "fp16"}
STRATEGIES = {training_pb2.DISTRIBUTED_STRATEGY_DDP: "ddp", training_pb2.DISTRIBUTED_STRATEGY_FSDP: "fsdp"}


def _set_fields(msg) -> dict[str, Any]:
    """The scalar fields the caller set (proto3 zero values mean "use the default")."""
    return {f.name: v for f, v in msg.ListFields() if f.type != f.TYPE_MESSAGE and f.type != f.TYPE_ENUM}


def spec_from_pb(s: training_pb2.TrainingSpec) -> TrainingJobSpec:
    """The typed spec from the fields the caller set; enum numbers outside the enums are refused by name."""
    raw = _set_fields(s)
    if s.HasField("base_model"):
        raw["base_model"] = convert.ref_from_pb(s.base_model).model_dump()
    if s.HasField("dataset"):
        raw["dataset"] = convert.ref_from_pb(s.dataset).model_dump()
    if s.method:
        raw["method"] = convert.enum_name(METHODS, s.method, "spec.method")
    if s.HasField("lora"):
        raw["lora"] = _set_fields(s.lora)
        if s.lora.target_modules:
            raw["lora"]["target_modules"] = list(s.lora.target_modules)
        if s.lora.preset:
            raw["lora"]["preset"] = convert.enum_name(PRESETS, s.lora.preset, "spec.lora.preset")
    if s.HasField("qlora"):
        raw["qlora"] = _set_fields(s.qlora)
        if s.qlora.compute_dtype:
            raw["qlora"]["compute_dtype"] = convert.enum_name(PRECISIONS, s.qlora.compute_dtype,
                                                              "spec.qlora.compute_dtype")
    if s.HasField("optimizer"):
        raw["optimizer"] = _set_fields(s.optimizer)
    if s.HasField("tracking"):
        raw["tracking"] = _set_fields(s.tracking)
    if s.precision:
        raw["precision"] = convert.enum_name(PRECISIONS, s.precision, "spec.precision")
    if s.strategy:
        raw["strategy"] = convert.enum_name(STRATEGIES, s.strategy, "spec.strategy")
    return parse(TrainingJobSpec, raw)


def plan_to_pb(p: Plan) -> training_pb2.TrainingPlan:
    e = p.estimate
    return training_pb2.TrainingPlan(
        peak_gib_per_gpu=e.peak_gib,
        breakdown=training_pb2.MemoryBreakdown(
            weights_gib=e.weights_gib, adapter_gib=e.adapter_gib, gradients_gib=e.gradients_gib,
            optimizer_gib=e.optimizer_gib, activations_gib=e.activations_gib, overhead_gib=e.overhead_gib),
        resources=convert.resources_to_pb(p.resources), feasible=p.fit.feasible, reason=p.fit.reason,
        suggestions=p.fit.suggestions, trainable_parameters=e.trainable_parameters,
        total_parameters=e.total_parameters, target_modules=p.spec.lora.target_modules, notes=p.notes)


class TrainingServicer(JobSurfaceServicer, training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, service: TrainingService):
        self.svc = service
        self.jobs = service.jobs

    async def SubmitTraining(self, request: training_pb2.SubmitTrainingRequest, context) -> pb.Job:
        job = await self.svc.submit(spec_from_pb(request.spec), convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def PlanTraining(self, request: training_pb2.PlanTrainingRequest, context) -> training_pb2.TrainingPlan:
        return plan_to_pb(await self.svc.plan(spec_from_pb(request.spec)))


def build(runtime: Runtime, settings: TrainingSettings) -> Registration:
    service = TrainingService(runtime.artifacts, runtime.runner, settings)
    return Registration(training_pb2_grpc.add_TrainingServiceServicer_to_server, TrainingServicer(service),
                        "tunery.v1.TrainingService")
