"""The server factory with the real registry servicer over a fake runner and a local store."""

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.cli.stack import health
from services.core.artifacts import ArtifactStore
from services.core.runtime import Runtime
from services.core.store import LocalObjectStore
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import registry_pb2, registry_pb2_grpc
from services.registry.service import RegistrySettings
from services.registry.servicer import build
from tests.fakes import FakeRunner
from tests.modeldirs import make_model
from tests.servers import ServerThread, wait_for

TOKEN = "unit-token"


@pytest.fixture
def env(tmp_path):
    objects = LocalObjectStore(tmp_path / "store")
    artifacts = ArtifactStore(objects, "unit")
    runner = FakeRunner(artifacts)
    st = ServerThread()
    settings = RegistrySettings(project="unit", store_url=objects.url, auth_tokens=TOKEN, port=0)
    port = st.start(settings, build, Runtime(objects, artifacts, runner))
    wait_for(lambda: health(port) == "SERVING", 10, what="SERVING")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield registry_pb2_grpc.RegistryServiceStub(ch), runner, port, tmp_path
    ch.close()
    st.close()


MD = [("authorization", f"Bearer {TOKEN}")]


def rpc_error(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_invalid_argument_carries_field_violations(env):
    stub, runner, _, tmp = env
    err = rpc_error(lambda: stub.ImportModel(registry_pb2.ImportModelRequest(
        spec=registry_pb2.ImportModelSpec(source=str(make_model(tmp / "m")), name="../up")), metadata=MD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    br = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err).details[0].Unpack(br)
    assert br.field_violations[0].field == "spec.name" and "no '..'" in br.field_violations[0].description
    assert runner.submitted == []


def test_valid_import_is_queued_with_the_typed_spec(env):
    stub, runner, _, tmp = env
    src = str(make_model(tmp / "m"))
    job = stub.ImportModel(registry_pb2.ImportModelRequest(
        spec=registry_pb2.ImportModelSpec(source=src, name="m"),
        options=pb.SubmitOptions(idempotency_key="k1", resources=pb.Resources(cpus=0.5), labels={"team": "x"})),
        metadata=MD)
    assert job.id == "k1" and job.state == pb.JOB_STATE_QUEUED
    req = runner.submitted[0]
    assert req.kind == "registry.import_model" and req.role == "control"
    assert req.spec == {"source": src, "name": "m", "revision": "", "allow_trust_remote_code": False,
                        "uploaded_from": ""}
    assert req.resources.cpus == 0.5 and req.labels == {"team": "x"}
    assert stub.GetJob(pb.GetJobRequest(job_id="k1"), metadata=MD).spec["source"] == src


def test_auth_and_exemptions(env):
    stub, _, port, _ = env
    for md in ([], [("authorization", "Bearer nope")], [("authorization", f"Basic {TOKEN}")]):
        assert rpc_error(lambda: stub.ListArtifacts(registry_pb2.ListArtifactsRequest(), metadata=md)).code() \
            == grpc.StatusCode.UNAUTHENTICATED
    assert health(port) == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert "tunery.v1.RegistryService" in names and "grpc.health.v1.Health" in names


def test_unexpected_errors_are_internal_not_leaked(env, monkeypatch):
    stub, runner, _, _ = env

    def boom(*a, **k):
        raise ZeroDivisionError("secret detail")

    monkeypatch.setattr(runner, "get", boom)
    err = rpc_error(lambda: stub.GetJob(pb.GetJobRequest(job_id="x"), metadata=MD))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in err.details() and "secret detail" not in err.details()


def test_stream_errors_map_too(env):
    stub, _, _, _ = env
    err = rpc_error(lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="missing"), metadata=MD)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="a/b"), metadata=MD)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_paging_tokens_are_checked(env):
    stub, _, _, _ = env
    err = rpc_error(lambda: stub.ListJobs(pb.ListJobsRequest(page_token="bogus"), metadata=MD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()
    err = rpc_error(lambda: stub.ListArtifacts(registry_pb2.ListArtifactsRequest(page_size=-1), metadata=MD))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
