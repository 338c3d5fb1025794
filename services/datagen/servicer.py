"""DatagenService over gRPC: proto <-> domain conversion only."""

from __future__ import annotations

from typing import Any

from services.core import convert
from services.core.job_api import JobSurfaceServicer
from services.core.runtime import Runtime
from services.core.server import Registration
from services.datagen.service import DatagenService, DatagenSettings
from services.core.specs import parse
from services.datagen.spec import GenerateDatasetRequest, PrepareDatasetSpec, PrepareOptions
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import datagen_pb2, datagen_pb2_grpc

FORMATS = {pb.DATASET_FORMAT_UNSPECIFIED: "auto", pb.DATASET_FORMAT_ALPACA: "alpaca", pb.DATASET_FORMAT_CHAT: "chat",
           pb.DATASET_FORMAT_SHAREGPT: "sharegpt", pb.DATASET_FORMAT_COMPLETION: "completion",
           pb.DATASET_FORMAT_PREFERENCE: "preference"}
FORMATS_TO_PB = {v: k for k, v in FORMATS.items()}
DEDUP = {datagen_pb2.DEDUP_MODE_NONE: "none", datagen_pb2.DEDUP_MODE_EXACT: "exact", datagen_pb2.DEDUP_MODE_NEAR: "near"}
ACTION = {datagen_pb2.DEDUP_ACTION_DROP: "drop", datagen_pb2.DEDUP_ACTION_FLAG: "flag"}
SEVERITY = {"error": datagen_pb2.ISSUE_SEVERITY_ERROR, "warning": datagen_pb2.ISSUE_SEVERITY_WARNING}


def prepare_options(s: datagen_pb2.PrepareDatasetSpec) -> dict[str, Any]:
    """Only the fields the caller set: the typed spec's defaults fill the rest."""
    opts: dict[str, Any] = {"format": convert.enum_name(FORMATS, s.format, "spec.format")}
    if s.HasField("holdout_fraction"):
        opts["holdout_fraction"] = s.holdout_fraction
    for proto_name, name in [("seed", "seed"), ("keep_empty_replies", "keep_empty_replies"),
                             ("near_duplicate_threshold", "near_duplicate_threshold"), ("max_tokens", "max_tokens"),
                             ("min_examples", "min_examples"), ("stratify_field", "stratify_field"),
                             ("max_reported_problems", "max_reported_problems"), ("drop_too_long", "drop_too_long")]:
        value = getattr(s, proto_name)
        if value:
            opts[name] = value
    if s.dedup:
        opts["dedup"] = convert.enum_name(DEDUP, s.dedup, "spec.dedup")
    if s.dedup_action:
        opts["dedup_action"] = convert.enum_name(ACTION, s.dedup_action, "spec.dedup_action")
    return opts


def prepare_spec_from_pb(s: datagen_pb2.PrepareDatasetSpec) -> PrepareDatasetSpec:
    # the proto's options sit on the spec itself: their errors name spec.<option>
    return PrepareDatasetSpec(dataset=convert.ref_from_pb(s.dataset), base_model=convert.ref_from_pb(s.base_model),
                              name=s.name, options=parse(PrepareOptions, prepare_options(s)))


def generate_request_from_pb(s: datagen_pb2.GenerateDatasetSpec) -> GenerateDatasetRequest:
    which = s.teacher.WhichOneof("source")
    e = s.teacher.endpoint
    return parse(GenerateDatasetRequest, {
        "recipe_yaml": s.recipe_yaml, "name": s.name, "num_examples": s.num_examples,
        "teacher": {"model": convert.ref_from_pb(s.teacher.model).model_dump() if which == "model" else None,
                    "endpoint": {"base_url": e.base_url, "model": e.model, "api_key_env": e.api_key_env}
                    if which == "endpoint" else None}})


def report_to_pb(ref: pb.ArtifactRef, r: dict[str, Any]) -> datagen_pb2.DatasetReport:
    counts = r.get("counts", {})
    return datagen_pb2.DatasetReport(
        dataset=ref, detected_format=FORMATS_TO_PB.get(r.get("detected_format", ""), 0),
        num_input=int(counts.get("input", 0)), num_train=int(counts.get("train", 0)),
        num_holdout=int(counts.get("holdout", 0)),
        num_duplicates=int(counts.get("exact_duplicates", 0)) + int(counts.get("near_duplicates", 0)),
        num_errors=int(counts.get("errors", 0)), num_warnings=int(counts.get("warnings", 0)),
        issues=[datagen_pb2.ValidationIssue(severity=SEVERITY.get(p.get("severity"), 0), file=p.get("file", ""),
                                            line=int(p.get("line") or 0), field=p.get("field") or "",
                                            message=p.get("message", "")) for p in r.get("problems", [])],
        train_sha256=r.get("train_sha256", ""), holdout_sha256=r.get("holdout_sha256", ""),
        html_path="report.html", stats=convert.struct({k: v for k, v in r.items() if k not in ("problems", "sample")}))


class DatagenServicer(JobSurfaceServicer, datagen_pb2_grpc.DatagenServiceServicer):
    def __init__(self, service: DatagenService):
        self.svc = service
        self.jobs = service.jobs

    async def PrepareDataset(self, request: datagen_pb2.PrepareDatasetRequest, context) -> pb.Job:
        job = await self.svc.prepare(prepare_spec_from_pb(request.spec), convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def GenerateDataset(self, request: datagen_pb2.GenerateDatasetRequest, context) -> pb.Job:
        job = await self.svc.generate(generate_request_from_pb(request.spec), convert.options_from_pb(request.options))
        return convert.job_to_pb(job)

    async def GetDatasetReport(self, request: datagen_pb2.GetDatasetReportRequest, context):
        manifest, report = await self.svc.report(convert.ref_from_pb(request.dataset))
        return report_to_pb(convert.ref_to_pb(manifest.ref()), report)


def build(runtime: Runtime, settings: DatagenSettings) -> Registration:
    service = DatagenService(runtime.artifacts, runtime.runner, settings)
    return Registration(datagen_pb2_grpc.add_DatagenServiceServicer_to_server, DatagenServicer(service),
                        "tunery.v1.DatagenService")
