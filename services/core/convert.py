"""Proto <-> domain conversion for the shared messages (artifacts, jobs, events). No grpc here."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from services.core.artifacts import ArtifactRef, Manifest
from services.core.errors import FieldViolation, InvalidArgument
from services.core.jobs import JobEvent, JobRecord, JobState, Resources, SubmitOptions
from services.gen.tunery.v1 import common_pb2 as pb

KIND_TO_PB = {
    "model": pb.ARTIFACT_KIND_MODEL,
    "dataset": pb.ARTIFACT_KIND_DATASET,
    "adapter": pb.ARTIFACT_KIND_ADAPTER,
    "report": pb.ARTIFACT_KIND_REPORT,
    "checkpoint": pb.ARTIFACT_KIND_CHECKPOINT,
    "suite": pb.ARTIFACT_KIND_SUITE,
}
PB_TO_KIND = {v: k for k, v in KIND_TO_PB.items()}
STATE_TO_PB = {
    JobState.VALIDATING: pb.JOB_STATE_VALIDATING,
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}
LEVEL_TO_PB = {"debug": pb.EVENT_LEVEL_DEBUG, "info": pb.EVENT_LEVEL_INFO,
               "warning": pb.EVENT_LEVEL_WARNING, "error": pb.EVENT_LEVEL_ERROR}
TYPE_TO_PB = {"message": pb.EVENT_TYPE_MESSAGE, "metrics": pb.EVENT_TYPE_METRICS, "artifact": pb.EVENT_TYPE_ARTIFACT}


def ts(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def ref_to_pb(ref: ArtifactRef) -> pb.ArtifactRef:
    return pb.ArtifactRef(uri=ref.uri, sha256=ref.sha256)


def ref_from_pb(ref: pb.ArtifactRef) -> ArtifactRef:
    return ArtifactRef(uri=ref.uri, sha256=ref.sha256)


def manifest_to_pb(m: Manifest) -> pb.Artifact:
    return pb.Artifact(
        id=m.id, kind=KIND_TO_PB.get(m.kind, pb.ARTIFACT_KIND_UNSPECIFIED), name=m.name, project=m.project,
        ref=ref_to_pb(m.ref()), parents=[ref_to_pb(p) for p in m.parents],
        files=[pb.FileEntry(path=f.path, size=f.size, sha256=f.sha256) for f in m.files],
        created_by_job=m.created_by_job, created_at=ts(m.created_at), metadata=struct(m.metadata),
        metrics=m.metrics, total_bytes=m.total_bytes,
    )


def resources_from_pb(r: pb.Resources, default: Resources) -> Resources:
    if not r.ByteSize():
        return default
    return Resources(cpus=r.cpus or default.cpus, gpus=r.gpus, memory_bytes=r.memory_bytes or default.memory_bytes,
                     accelerator_type=r.accelerator_type, custom=dict(r.custom))


def resources_to_pb(r: Resources) -> pb.Resources:
    return pb.Resources(cpus=r.cpus, gpus=r.gpus, memory_bytes=r.memory_bytes,
                        accelerator_type=r.accelerator_type, custom=r.custom)


def job_to_pb(j: JobRecord) -> pb.Job:
    return pb.Job(
        id=j.id, kind=j.kind, service=j.service, state=STATE_TO_PB[j.state], state_reason=j.state_reason,
        created_at=ts(j.created_at), started_at=ts(j.started_at), finished_at=ts(j.finished_at),
        spec=struct(j.spec), spec_sha256=j.spec_sha256, resources=resources_to_pb(j.resources),
        outputs=[ref_to_pb(o) for o in j.outputs], latest_metrics=j.latest_metrics,
        last_event_cursor=j.last_event_cursor, labels=j.labels,
    )


def event_to_pb(e: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        cursor=e.cursor, job_id=e.job_id, time=ts(e.time), level=LEVEL_TO_PB.get(e.level, pb.EVENT_LEVEL_INFO),
        type=TYPE_TO_PB.get(e.type, pb.EVENT_TYPE_MESSAGE), text=e.text, step=e.step, total_steps=e.total_steps,
        metrics=e.metrics, artifact=ref_to_pb(e.artifact) if e.artifact else None,
        state=STATE_TO_PB[e.state] if e.state else pb.JOB_STATE_UNSPECIFIED,
    )


def message_to_dict(msg) -> dict[str, Any]:
    """A spec message as the plain dict a typed job spec validates (proto field names, enums as names)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def options_from_pb(o: pb.SubmitOptions) -> SubmitOptions:
    return SubmitOptions(key=o.idempotency_key,
                         resources=resources_from_pb(o.resources, Resources()) if o.HasField("resources") else None,
                         labels=dict(o.labels))


def enum_name(names: dict[int, str], value: int, field: str) -> str:
    """A proto enum value as the domain's word; a number outside the enum (a newer client's, or a fuzzer's) is
    INVALID_ARGUMENT naming the field, never a KeyError."""
    if value in names:
        return names[value]
    raise InvalidArgument.field(field, f"{value} is not a known value (known: "
                                f"{', '.join(f'{k} ({v})' for k, v in sorted(names.items()))})")


def unknown_enums(msg, prefix: str = "") -> list[FieldViolation]:
    """Every enum field of a request (nested messages, lists and maps too) whose number the enum does not define.
    proto3 enums are open: a newer client's or a fuzzer's number would otherwise reach the service and quietly
    become a default (`dedup: 77`). Paths as the protos name them: `spec.dedup`, `spec.tests[2].type`."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    def bad(fd, value, path: str) -> list[FieldViolation]:
        if value in fd.enum_type.values_by_number:
            return []
        known = ", ".join(f"{v.name} ({v.number})" for v in fd.enum_type.values)
        return [FieldViolation(path, f"{value} is not a known {fd.enum_type.name} (known: {known})")]

    out: list[FieldViolation] = []
    for fd, value in msg.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.type == FD.TYPE_ENUM:
            for i, v in enumerate(value) if fd.is_repeated else [(None, value)]:
                out += bad(fd, v, path if i is None else f"{path}[{i}]")
        elif fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            for key, v in value.items():
                if vfd.type == FD.TYPE_ENUM:
                    out += bad(vfd, v, f"{path}[{key!r}]")
                elif vfd.type == FD.TYPE_MESSAGE:
                    out += unknown_enums(v, f"{path}[{key!r}].")
        elif fd.type == FD.TYPE_MESSAGE:
            for i, m in enumerate(value) if fd.is_repeated else [(None, value)]:
                out += unknown_enums(m, f"{path}." if i is None else f"{path}[{i}].")
    return out
