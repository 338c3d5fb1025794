"""Every RPC of every implemented service under fuzzed requests (hypothesis, fixed seed, bounded count), as an
outside tester sends them: the real servicers and services over gRPC on 127.0.0.1, a local store, and a fake
runner (nothing runs; unit tier). Asserted: no INTERNAL or UNKNOWN, no artifact created, every service still
SERVING. The requests are built from the proto descriptors: every field, enums with unknown numbers, NaN and
infinities, huge and odd strings (paths of 100,000 characters, NUL bytes), nested messages, maps and lists.

The outside run that found the INTERNALs (about 10,000 requests) is reproduced by the explicit cases below.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from services.cli.stack import health
from services.core.artifacts import ArtifactStore
from services.core.convert import unknown_enums
from services.core.runtime import Runtime
from services.core.store import LocalObjectStore
from services.datagen.service import DatagenSettings
from services.datagen.servicer import build as build_datagen
from services.evaluation.service import EvaluationSettings
from services.evaluation.servicer import build as build_evaluation
from services.gen.tunery.v1 import (
    common_pb2,
    datagen_pb2,
    datagen_pb2_grpc,
    evaluation_pb2,
    evaluation_pb2_grpc,
    merging_pb2,
    merging_pb2_grpc,
    quantization_pb2,
    quantization_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    serving_pb2,
    serving_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services.merging.service import MergingSettings
from services.merging.servicer import build as build_merging
from services.quantization.service import QuantizationSettings
from services.quantization.servicer import build as build_quantization
from services.registry.service import RegistrySettings
from services.registry.servicer import build as build_registry
from services.serving.service import ServingSettings
from services.serving.servicer import build as build_serving
from services.training.service import TrainingSettings
from services.training.servicer import build as build_training
from tests.fakes import FakeRunner
from tests.servers import ServerThread, wait_for

pytestmark = pytest.mark.unit

TOKEN = "fuzz-token"
MD = [("authorization", f"Bearer {TOKEN}")]
EXAMPLES_PER_RPC = 60
SERVICES = {  # name: (settings, build, pb2 module, grpc module, service name in the proto)
    "registry": (RegistrySettings, build_registry, registry_pb2, registry_pb2_grpc, "RegistryService"),
    "datagen": (DatagenSettings, build_datagen, datagen_pb2, datagen_pb2_grpc, "DatagenService"),
    "training": (TrainingSettings, build_training, training_pb2, training_pb2_grpc, "TrainingService"),
    "merging": (MergingSettings, build_merging, merging_pb2, merging_pb2_grpc, "MergingService"),
    "quantization": (QuantizationSettings, build_quantization, quantization_pb2, quantization_pb2_grpc,
                     "QuantizationService"),
    "evaluation": (EvaluationSettings, build_evaluation, evaluation_pb2, evaluation_pb2_grpc, "EvaluationService"),
    "serving": (ServingSettings, build_serving, serving_pb2, serving_pb2_grpc, "ServingService"),
}
NOT_A_BUG = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_DETAILS = 2000  # characters of an error message a client gets

ODD_STRINGS = ["", " ", "/", "/" + "a" * 100_000, "a" * 5000, "B!" * 12_000, "hf://" + "c" * 30_000, "/tmp/x\x00y", "../../etc/passwd", "/etc/passwd",
               "/proc/self/environ", "s3://bucket/key", "hf://org/name", "hf://", "file:///etc", "http://127.0.0.1:1/x",
               "model-0123456789ab", "dataset-x", "adapter-x", "artifact:x", "é" * 300, "{}", "[]", "null", "NaN",
               "-1", "1e309", "lora", "qlora", "dora", "cuda", "cpu", "bf16", "*", "%s%n", "\n\r\t", "🙂"]


def scalar(f: FD):
    t = f.type
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64 if t == FD.TYPE_DOUBLE else 32),
                         st.sampled_from([0.0, -1.0, 1e300 if t == FD.TYPE_DOUBLE else 3e38, math.nan, math.inf]))
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, -1, 1, 2**31 - 1]))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, -1, 1, 2**63 - 1]))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=40))
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\xff\xfe", b"a: [", b"tests: []\n"]))
    if t == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers reach the servicer
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-3, 200))
    raise AssertionError(f"unhandled field type {t}")


def message(desc, depth: int = 0):
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields = {}
    for f in desc.fields:
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            vs = message(v.message_type, depth + 1) if v.type == FD.TYPE_MESSAGE else scalar(v)
            fields[f.name] = st.dictionaries(scalar(k), vs, max_size=3)
        elif f.type == FD.TYPE_MESSAGE:
            one = message(f.message_type, depth + 1)
            fields[f.name] = st.lists(one, max_size=3) if f.is_repeated else one
        else:
            fields[f.name] = st.lists(scalar(f), max_size=3) if f.is_repeated else scalar(f)

    def build(values: dict):
        m = cls()
        for name, v in values.items():
            f = desc.fields_by_name[name]
            if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                target = getattr(m, name)
                for key, val in v.items():
                    if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                        target[key].CopyFrom(val)
                    else:
                        target[key] = val
            elif f.is_repeated:
                getattr(m, name).extend(v)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(m, name).CopyFrom(v)
            else:
                setattr(m, name, v)
        return m

    return st.fixed_dictionaries({}, optional=fields).map(build)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    objects = LocalObjectStore(root / "store")
    artifacts = ArtifactStore(objects, "fuzz")
    runtime = Runtime(objects, artifacts, FakeRunner(artifacts))
    st_ = ServerThread()
    ports = {}
    for name, (cls, build, *_rest) in SERVICES.items():
        ports[name] = st_.start(cls(project="fuzz", store_url=objects.url, auth_tokens=TOKEN, port=0,
                                    cache_dir=root / "cache"), build, runtime)
        wait_for(lambda p=ports[name]: health(p) == "SERVING", 10, what=f"{name} SERVING")
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{p}") for name, p in ports.items()}
    yield ports, channels, artifacts
    for ch in channels.values():
        ch.close()
    st_.stop_all(0.5)


def methods():
    for name, (_, _, pb2, _, service) in SERVICES.items():
        for m in pb2.DESCRIPTOR.services_by_name[service].methods:
            yield pytest.param(name, m.name, id=f"{service}.{m.name}")


def call(stack, service: str, method: str, request):
    """The status an RPC answered (OK when it did); a stream is read for a moment."""
    _, channels, _ = stack
    grpc_mod, svc = SERVICES[service][3], SERVICES[service][4]
    stub = getattr(grpc_mod, f"{svc}Stub")(channels[service])
    desc = SERVICES[service][2].DESCRIPTOR.services_by_name[svc].methods_by_name[method]
    try:
        if desc.server_streaming:
            for _ in getattr(stub, method)(request, metadata=MD, timeout=1.0):
                pass
        elif desc.client_streaming:  # an upload: the fuzzed message, then the same one again
            getattr(stub, method)(iter([request, request]), metadata=MD, timeout=20)
        else:
            getattr(stub, method)(request, metadata=MD, timeout=20)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("service, method", list(methods()))
def test_fuzzed_requests_never_reach_internal(stack, service, method):
    pb2, svc = SERVICES[service][2], SERVICES[service][4]
    desc = pb2.DESCRIPTOR.services_by_name[svc].methods_by_name[method]
    seen: list[tuple] = []

    @seed(20261202)
    @settings(max_examples=EXAMPLES_PER_RPC, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(message(desc.input_type))
    def one(request):
        code, details = call(stack, service, method, request)
        seen.append(code)
        assert code not in NOT_A_BUG, f"{svc}.{method} answered {code.name}: {details}\nrequest: {request}"
        # an error that echoes a long value must still reach the client as itself (#11.3): not RESOURCE_EXHAUSTED
        # for trailers over the client's limit, and a message of a readable size
        assert not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in details), (svc, method, details)
        assert len(details) <= MAX_DETAILS, (svc, method, len(details), details[:300])
        if unknown_enums(request):  # a number its enum does not define is refused, whatever else is wrong
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (svc, method, code, details)

    one()
    ports, _, artifacts = stack
    made, _ = artifacts.list(limit=1000)
    assert not made, f"a fuzzed request created artifacts: {[(m.kind, m.name) for m in made]}"
    assert all(health(p) == "SERVING" for p in ports.values())
    assert len(seen) >= EXAMPLES_PER_RPC // 2
    print(f"{svc}.{method}: " + ", ".join(f"{c.name} {n}" for c, n in Counter(seen).most_common()))


RES = common_pb2.Resources
CASES = [  # the outside run's INTERNALs, each a request error naming its field
    ("training", "SubmitTraining", training_pb2.SubmitTrainingRequest(spec=training_pb2.TrainingSpec(strategy=7)),
     "spec.strategy"),
    ("training", "PlanTraining", training_pb2.PlanTrainingRequest(spec=training_pb2.TrainingSpec(strategy=7)),
     "spec.strategy"),
    ("training", "SubmitTraining", training_pb2.SubmitTrainingRequest(spec=training_pb2.TrainingSpec(precision=70)),
     "spec.precision"),
    ("registry", "ImportModel", registry_pb2.ImportModelRequest(
        spec=registry_pb2.ImportModelSpec(source="/" + "a" * 100_000, name="m")),
     "spec.source"),
    ("registry", "ImportDataset", registry_pb2.ImportDatasetRequest(
        spec=registry_pb2.ImportDatasetSpec(source="/" + "a" * 100_000, name="d")),
     "spec.source"),
    ("registry", "ImportDataset", registry_pb2.ImportDatasetRequest(
        spec=registry_pb2.ImportDatasetSpec(source="/etc/hostname", name="d"), options=common_pb2.SubmitOptions(resources=RES(cpus=math.nan))),
     "resources"),
    ("registry", "ImportModel", registry_pb2.ImportModelRequest(
        spec=registry_pb2.ImportModelSpec(source="/tmp", name="m"), options=common_pb2.SubmitOptions(resources=RES(cpus=math.inf))), "resources"),
]


DP = datagen_pb2
CASES += [  # #11.3: enum numbers outside the enum quietly became the default; long echoed values overflowed
    ("datagen", "PrepareDataset", DP.PrepareDatasetRequest(spec=DP.PrepareDatasetSpec(dedup=77)), "spec.dedup"),
    ("datagen", "PrepareDataset", DP.PrepareDatasetRequest(spec=DP.PrepareDatasetSpec(format=99)), "spec.format"),
    ("registry", "ListArtifacts", registry_pb2.ListArtifactsRequest(kind=42), "kind"),
    ("registry", "ImportModel", registry_pb2.ImportModelRequest(
        spec=registry_pb2.ImportModelSpec(source="hf://" + "c" * 30_000, name="m")), "spec.source"),
    ("registry", "GetArtifact", registry_pb2.GetArtifactRequest(id="B!" * 12_000), "id"),
    ("serving", "GetDeployment", serving_pb2.GetDeploymentRequest(name="N" * 20_000), "name"),
]


@pytest.mark.parametrize("service, method, request_, field", CASES,
                         ids=[f"{c[1]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_the_outside_findings_are_request_errors(stack, service, method, request_, field):
    code, details = call(stack, service, method, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, (code, details[:500])
    assert len(details) <= MAX_DETAILS, len(details)
    # a long value is shown cut ("… (N chars)") or only by its length, never whole
    assert not re.search(r"\S{200,}", details), details[:500]
