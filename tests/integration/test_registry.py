"""The registry end to end: gRPC -> Ray job -> S3, against a real Ray head, a real S3 server and real gRPC."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.cli.stack import health
from services.core.artifacts import ArtifactStore
from services.core.store import open_store
from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient
from tests.modeldirs import make_model, make_sharded_model
from tests.servers import REPO, wait_for
from tests.session import TOKEN

pytestmark = pytest.mark.integration


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def succeeded(client: TuneryClient, job: pb.Job, timeout: float = 120) -> pb.Job:
    final = client.wait(job.id, timeout)
    assert final.state == pb.JOB_STATE_SUCCEEDED, (pb.JobState.Name(final.state), final.state_reason)
    return final


def test_import_model_end_to_end(registry, settings, tiny_model, tmp_path):
    job = registry.import_model(str(tiny_model), "tiny-llama")
    assert job.kind == "registry.import_model" and job.service == "registry"
    final = succeeded(registry, job)
    assert len(final.outputs) == 1
    art = registry.get_artifact(final.outputs[0].uri)
    source_files = {p.relative_to(tiny_model).as_posix(): p for p in tiny_model.rglob("*") if p.is_file()}
    assert {f.path: f.sha256 for f in art.files} == {k: sha(p) for k, p in source_files.items()}
    meta = dict(art.metadata)
    assert meta["architecture"] == "LlamaForCausalLM" and meta["is_causal_lm"] is True
    assert meta["is_moe"] is False and meta["parameters"] > 0 and meta["has_chat_template"] is True
    assert art.created_by_job == job.id and art.ref.sha256
    # the bytes are really in S3 under this project's prefix, and a job-side materialisation verifies them
    store = ArtifactStore(open_store(settings), settings.project)
    local = store.materialize(art.id, tmp_path / "cache")
    for rel, src in source_files.items():
        assert (local / rel).read_bytes() == src.read_bytes()
    listed = [a.id for a in registry.list_artifacts(kind=pb.ARTIFACT_KIND_MODEL)]
    assert listed == [art.id]
    # the job's own logs are JSON lines carrying its job id
    from ray.job_submission import JobSubmissionClient

    lines = [json.loads(l) for l in JobSubmissionClient(settings.ray_address).get_job_logs(job.id).splitlines()
             if l.startswith("{")]
    assert lines and all(rec["job_id"] == job.id for rec in lines)


def test_moe_model_is_recognised(registry, tiny_moe):
    final = succeeded(registry, registry.import_model(str(tiny_moe), "tiny-moe"))
    meta = dict(registry.get_artifact(final.outputs[0].uri).metadata)
    assert meta["is_moe"] is True and meta["num_experts"] >= 2


def test_reimport_uploads_zero_bytes(registry, tiny_model):
    first = succeeded(registry, registry.import_model(str(tiny_model), "tiny-llama", upload=False))
    second = succeeded(registry, registry.import_model(str(tiny_model), "tiny-llama", upload=False))
    assert first.id != second.id
    assert first.latest_metrics["bytes_uploaded"] > 0
    assert second.latest_metrics["bytes_uploaded"] == 0
    assert first.outputs[0].uri == second.outputs[0].uri  # the same immutable artifact


def test_import_dataset(registry, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) for i in range(20)))
    final = succeeded(registry, registry.import_dataset(str(data), "numbers"))
    art = registry.get_artifact(final.outputs[0].uri)
    assert [(f.path, f.sha256) for f in art.files] == [("train.jsonl", sha(data))]
    assert dict(art.metadata)["stage"] == "raw"


def test_idempotent_resubmit_and_conflict(registry, tiny_model, tmp_path):
    a = registry.import_model(str(tiny_model), "tiny-llama", key="import-key-1")
    b = registry.import_model(str(tiny_model), "tiny-llama", key="import-key-1")
    assert a.id == b.id == "import-key-1"
    jobs = [j.id for j in registry.list_jobs()]
    assert jobs.count("import-key-1") == 1
    err = code_of(lambda: registry.import_model(str(tiny_model), "another-name", key="import-key-1"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "different spec" in err.details()
    succeeded(registry, a)
    # after it finished, the same key and spec still answers with the same job
    assert registry.import_model(str(tiny_model), "tiny-llama", key="import-key-1").id == a.id


def test_cancel_running_job_leaves_no_artifact(registry, tmp_path):
    model = make_sharded_model(tmp_path / "sharded", shards=400)
    job = registry.import_model(str(model), "sharded", upload=False)
    wait_for(lambda: registry.get_job(job.id).latest_metrics.get("bytes_done", 0) > 0, 60, what="upload started")
    registry.cancel_job(job.id, "test cancels")
    final = registry.wait(job.id, 60)
    assert final.state == pb.JOB_STATE_CANCELLED
    assert final.latest_metrics["fraction"] < 1.0  # it really was stopped mid-upload
    assert list(registry.list_artifacts()) == []


def test_queued_job_says_why_and_cancels(registry, tiny_model):
    opts = pb.SubmitOptions(resources=pb.Resources(cpus=1, gpus=1))
    job = registry.import_model(str(tiny_model), "needs-gpu", options=opts)
    time.sleep(1.0)
    got = registry.get_job(job.id)
    assert got.state == pb.JOB_STATE_QUEUED
    assert "GPU" in got.state_reason and "cannot be scheduled" in got.state_reason
    cancelled = registry.cancel_job(job.id)
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    time.sleep(1.0)
    assert registry.get_job(job.id).state == pb.JOB_STATE_CANCELLED
    assert list(registry.list_artifacts()) == []


def test_job_killed_mid_upload_leaves_no_listed_artifact(registry, settings, tmp_path):
    model = make_sharded_model(tmp_path / "sharded", shards=400)
    job = registry.import_model(str(model), "killed", upload=False)
    events = []
    for ev in registry.watch(job.id):
        events.append(ev)
        if ev.type == pb.EVENT_TYPE_METRICS and ev.step >= 20:
            break
    pid = int(re.search(r"pid (\d+)", events[0].text).group(1))
    os.kill(pid, signal.SIGKILL)
    final = registry.wait(job.id, 60)
    assert final.state == pb.JOB_STATE_FAILED
    assert list(registry.list_artifacts()) == []
    # the blobs it did upload exist, yet nothing names them: no manifest, nothing readable
    store = ArtifactStore(open_store(settings), settings.project)
    assert any(True for _ in store.objects.list(store.key("blobs") + "/"))
    assert list(store.objects.list(store.key("artifacts") + "/")) == []


def test_watch_resumes_after_server_restart(servers, settings, tmp_path):
    from services.registry.servicer import build

    model = make_sharded_model(tmp_path / "sharded", shards=120)
    port = servers.start(settings, build)
    wait_for(lambda: health(port) == "SERVING", 30, what="SERVING")
    client = TuneryClient(f"127.0.0.1:{port}", TOKEN)
    job = client.import_model(str(model), "watched", upload=False)
    seen = []
    for ev in client.watch(job.id):
        seen.append(ev.cursor)
        if len(seen) == 10:
            # drop the server under the stream, then bring a new one up on the same port
            servers.stop_all(grace=0)
            settings_again = settings.model_copy(update={"port": port})
            servers.start(settings_again, build)
    assert seen[-1] == seen[-2]  # the closing event repeats the last cursor
    cursors = seen[:-1]
    assert cursors == list(range(1, len(cursors) + 1)), "events missed or repeated across the reconnect"
    full = [ev.cursor for ev in client.watch(job.id, follow=False)]
    assert full == cursors
    # and an explicit resume from a cursor gives exactly the rest
    assert [ev.cursor for ev in client.watch(job.id, after_cursor=7, follow=False)] == cursors[7:]
    client.close()


def test_auth(registry, servers, settings):
    port = int(registry.target.rsplit(":", 1)[1])
    for token in ("", "wrong-token"):
        c = TuneryClient(f"127.0.0.1:{port}", token)
        err = code_of(lambda: list(c.list_artifacts()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("missing" if not token else "invalid") in err.details()
        err = code_of(lambda: list(c.watch("anything")))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        c.close()
    assert health(port) == "SERVING"  # health is exempt


def violations(err) -> dict[str, str]:
    status = rpc_status.from_call(err)
    out = {}
    for d in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if d.Unpack(br):
            out.update({v.field: v.description for v in br.field_violations})
    return out


def test_bad_inputs_get_exact_status_and_queue_nothing(registry, tmp_path, tiny_model):
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "README.md").write_text("hello")
    bad_config = make_model(tmp_path / "bad-config")
    (bad_config / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 8,,\n}')
    remote = make_model(tmp_path / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    cases = [
        (lambda: registry.import_model(str(tmp_path / "nope"), "m"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (lambda: registry.import_model(str(not_model), "m"), grpc.StatusCode.INVALID_ARGUMENT, "no config.json"),
        (lambda: registry.import_model(str(bad_config), "m"), grpc.StatusCode.INVALID_ARGUMENT, "line 3"),
        (lambda: registry.import_model(str(tiny_model), "../etc"), grpc.StatusCode.INVALID_ARGUMENT, "no '..'"),
        (lambda: registry.import_model(str(tiny_model), "Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        (lambda: registry.import_model("relative/path", "m"), grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        (lambda: registry.import_model(str(remote), "m"), grpc.StatusCode.FAILED_PRECONDITION, "allow_trust_remote_code"),
        (lambda: registry.import_model(str(tiny_model), "m", key="../x"), grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
        (lambda: registry.import_dataset(str(tmp_path / "none.jsonl"), "d"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (lambda: registry.get_artifact("model-nothing-000000000000"), grpc.StatusCode.NOT_FOUND, "not found"),
        (lambda: registry.get_job("no-such-job"), grpc.StatusCode.NOT_FOUND, "not found"),
        (lambda: registry.delete_artifact(""), grpc.StatusCode.INVALID_ARGUMENT, "required"),
    ]
    for call, code, text in cases:
        err = code_of(call)
        assert err.code() == code, (text, err.code(), err.details())
        assert text in err.details(), (text, err.details())
    err = code_of(lambda: registry.import_model(str(tiny_model), "../etc"))
    assert "spec.name" in violations(err)
    assert list(registry.list_jobs()) == []  # nothing was queued


def test_job_side_validation_failure_is_reported(registry, tmp_path):
    model = make_model(tmp_path / "corrupt")
    raw = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(raw[: len(raw) - 100])  # truncated weights
    final = registry.wait(registry.import_model(str(model), "corrupt").id, 60)
    assert final.state == pb.JOB_STATE_FAILED
    assert "corrupt or truncated" in final.state_reason
    events = list(registry.watch(final.id))
    assert events[-1].state == pb.JOB_STATE_FAILED and events[-1].level == pb.EVENT_LEVEL_ERROR
    assert list(registry.list_artifacts()) == []


def test_lineage_and_guarded_delete(registry, settings, tiny_model):
    model = registry.get_artifact(succeeded(registry, registry.import_model(str(tiny_model), "base")).outputs[0].uri)
    store = ArtifactStore(open_store(settings), settings.project)
    w = store.writer("adapter", "child", parents=[store.get(model.id).ref()], job_id="test")
    w.add_bytes(b"{}", "adapter_config.json")
    child, created = w.commit()
    assert created
    chain = registry.lineage(child.id)
    assert [a.id for a in chain] == [child.id, model.id]
    err = code_of(lambda: registry.delete_artifact(model.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and child.id in err.details()
    assert registry.delete_artifact(child.id) == child.id
    assert registry.delete_artifact(model.id) == model.id
    assert list(registry.list_artifacts()) == []


def test_every_service_shares_the_job_surface(servers, settings, registry, tiny_model):
    from services.embedded.__main__ import SERVICES
    from services.gen.tunery.v1 import pipeline_pb2, pipeline_pb2_grpc

    ports = {}
    for settings_cls, build in SERVICES[1:]:
        s = settings_cls(**{**settings.model_dump(), "service": settings_cls.model_fields["service"].default, "port": 0})
        ports[s.service] = servers.start(s, build)
    assert len(ports) == 7
    job = succeeded(registry, registry.import_model(str(tiny_model), "t"))
    with grpc.insecure_channel(f"127.0.0.1:{ports['pipeline']}") as ch:
        stub = pipeline_pb2_grpc.PipelineServiceStub(ch)
        md = [("authorization", f"Bearer {TOKEN}")]
        err = code_of(lambda: stub.SubmitPipeline(pipeline_pb2.SubmitPipelineRequest(), metadata=md))
        # an empty pipeline is refused before anything is queued, every missing part named
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(f in err.details() for f in ("spec: base.source", "spec: data", "spec: train")), err.details()
        # the shared job surface works on every service: it sees the registry's job...
        assert stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=md).state == pb.JOB_STATE_SUCCEEDED
        # ...but lists only its own jobs unless asked for all
        assert list(stub.ListJobs(pb.ListJobsRequest(), metadata=md).jobs) == []
        assert [j.id for j in stub.ListJobs(pb.ListJobsRequest(all_services=True), metadata=md).jobs] == [job.id]


def test_health_is_not_serving_until_ray_answers(servers, settings):
    from services.registry.servicer import build
    from services.core.net import free_port

    dead = settings.model_copy(update={"ray_address": f"http://127.0.0.1:{free_port()}"})
    port = servers.start(dead, build)
    time.sleep(1.5)
    assert health(port) == "NOT_SERVING"
    assert health(port, "tunery.v1.RegistryService") == "NOT_SERVING"
    assert health(port, "tunery.liveness") == "SERVING"  # alive, just not ready


def test_service_process_shuts_down_gracefully_on_sigterm(settings, tmp_path):
    env = {**os.environ, "TUNERY_PROJECT": settings.project, "TUNERY_STORE_URL": settings.store_url,
           "TUNERY_S3_ENDPOINT": settings.s3_endpoint, "TUNERY_S3_ACCESS_KEY": settings.s3_access_key,
           "TUNERY_S3_SECRET_KEY": settings.s3_secret_key, "TUNERY_RAY_ADDRESS": settings.ray_address,
           "TUNERY_AUTH_TOKENS": TOKEN, "TUNERY_REGISTRY_PORT": "0",
           "TUNERY_PORTS_FILE": str(ports_file := tmp_path / "ports.json")}
    proc = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(ports_file.exists, 60, what="the registry process to report its port")
        port = json.loads(ports_file.read_text())["registry"]
        wait_for(lambda: health(port) == "SERVING", 60, what="registry process SERVING")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        logs = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
        assert any("shutting down" in rec["msg"] for rec in logs)  # JSON logs
    finally:
        if proc.poll() is None:
            proc.kill()
