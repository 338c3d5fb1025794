"""ServingService's checks over a fake runner and a local store (every refusal with its status, the limits it
fills in, the record written only after every check), the servicer's proto <-> spec conversion, the job's Serve
options (scale-to-zero, one version per fixed config), vLLM's runtime-LoRA arguments; the real deployments are in
tests/integration/test_serving.py."""

from __future__ import annotations

import asyncio

import pytest

from services.core.artifacts import ArtifactStore
from services.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.core.jobs import SubmitOptions
from services.core.specs import parse
from services.core.store import LocalObjectStore
from services.core.vllm import ServerSpec, server_command, server_env
from services.gen.tunery.v1 import serving_pb2
from services.serving import job
from services.serving.service import ServingService, ServingSettings
from services.serving.servicer import spec_from_pb, spec_to_pb
from services.serving.spec import DeploymentSpec, LoraModule, ServeJobSpec
from tests.fakes import FakeRunner

pytestmark = pytest.mark.unit


@pytest.fixture
def env(tmp_path):
    store = ArtifactStore(LocalObjectStore(tmp_path / "s"), "p")
    runner = FakeRunner(store)
    svc = ServingService(store, runner, ServingSettings(project="p", port=0, ray_address="http://127.0.0.1:9"))
    svc._live = lambda: {}  # no Serve on the fake cluster (tests/integration/test_serving.py has the real one)

    def artifact(kind, name, metadata=None, parents=()):
        w = store.writer(kind, name, parents=parents)
        w.add_bytes(name.encode(), "config.json" if kind == "model" else "adapter_config.json")
        return w.commit(metadata or {})[0]

    base = artifact("model", "base", {"architecture": "LlamaForCausalLM"})
    other = artifact("model", "other", {"architecture": "LlamaForCausalLM"})
    adapter = artifact("adapter", "a", {"rank": 8, "base_architecture": "LlamaForCausalLM"}, [base.ref()])
    return svc, store, runner, artifact, base, other, adapter


def spec(model, adapters=(), **kw) -> DeploymentSpec:
    return DeploymentSpec(name="d", model=model.ref(), adapters=[LoraModule(name=n, adapter=a.ref())
                                                                 for n, a in adapters], **kw)


def create(svc, s, options=SubmitOptions()):
    return asyncio.run(svc.create(s, options))


def test_a_valid_deployment_is_recorded_then_queued_with_its_limits(env):
    svc, store, runner, _, base, _, adapter = env
    record = create(svc, spec(base, [("style", adapter)]))
    job_spec = ServeJobSpec.model_validate(record.spec)
    d = job_spec.deployment
    assert record.kind == "serving.deploy" and job_spec.action == "deploy"
    assert d.served_name == "base" and d.served_models() == ["base", "style"]
    assert d.max_loras == 4 and d.max_lora_rank == 16  # room to hot-add: 4 adapters, rank up to 16
    assert d.cpus_per_replica == 1.0 and d.device == "cpu"
    stored = svc.records.get("d")
    assert stored.state == "STARTING" and stored.job_id == record.id and len(stored.api_key) >= 24
    assert stored.base_url == "http://127.0.0.1:8000/d/v1"
    # the same spec again: the same job; another spec under the name: ALREADY_EXISTS
    assert create(svc, spec(base, [("style", adapter)])).id == record.id
    with pytest.raises(AlreadyExists, match="delete it first"):
        create(svc, spec(base))


def test_a_gpu_in_the_options_makes_a_cuda_deployment(env):
    from services.core.jobs import Resources

    svc, *_, base, _, _ = env
    record = create(svc, spec(base), SubmitOptions(resources=Resources(cpus=2, gpus=2)))
    d = ServeJobSpec.model_validate(record.spec).deployment
    assert d.device == "cuda" and d.tensor_parallel_size == 2 and d.cpus_per_replica == 2
    assert record.resources.cpus == pytest.approx(0.1)  # the job only drives Serve


@pytest.mark.parametrize("case, error, words", [
    ("other base", FailedPrecondition, "trained on"),
    ("rank", FailedPrecondition, "max_lora_rank"),
    ("quantized", FailedPrecondition, "open bugs on LoRA"),
    ("names", InvalidArgument, "own name"),
    ("loras", InvalidArgument, "max_loras"),
    ("missing", NotFound, "nope"),
    ("architecture", FailedPrecondition, "trained on a Qwen2ForCausalLM"),
])
def test_refusals_write_nothing(env, case, error, words):
    from services.core.artifacts import ArtifactRef

    svc, store, runner, artifact, base, other, adapter = env
    quantized = artifact("model", "q", {"architecture": "LlamaForCausalLM", "form": "quantized",
                                        "quantization": "gptq-w4a16"}, [base.ref()])
    qwen = artifact("adapter", "qa", {"rank": 8, "base_architecture": "Qwen2ForCausalLM"}, [base.ref()])
    s = {"other base": spec(other, [("style", adapter)]),
         "rank": spec(base, [("style", adapter)], max_lora_rank=1),
         "quantized": spec(quantized, [("style", adapter)]),
         "names": spec(base, [("base", adapter)]),
         "loras": spec(base, [("a", adapter), ("b", adapter)], max_loras=1),
         "missing": DeploymentSpec(name="d", model=ArtifactRef(uri="tunery://p/model-nope-000000000000")),
         "architecture": spec(base, [("qwen", qwen)])}[case]
    with pytest.raises(error, match=words):
        create(svc, s)
    assert svc.records.get("d") is None and runner.submitted == []


def test_the_spec_refuses_what_vllm_does_not_take():
    with pytest.raises(ValueError, match="tool-call parser"):
        DeploymentSpec(tool_call_parser="nope")
    with pytest.raises(ValueError, match="max LoRA rank"):
        DeploymentSpec(max_lora_rank=12)
    with pytest.raises(InvalidArgument):
        parse(DeploymentSpec, {"replicas": 0})


def test_adapter_changes_need_a_ready_deployment(env):
    svc, *_, base, _, adapter = env
    with pytest.raises(NotFound, match="no deployment named"):
        asyncio.run(svc.add_adapter("d", LoraModule(name="x", adapter=adapter.ref()), SubmitOptions()))
    create(svc, spec(base))
    # the fake cluster has no Serve: the record's job is queued and nothing is READY
    with pytest.raises(FailedPrecondition, match="READY"):
        asyncio.run(svc.add_adapter("d", LoraModule(name="x", adapter=adapter.ref()), SubmitOptions()))


def test_proto_round_trip():
    pb = serving_pb2.DeploymentSpec(name="d", replicas=3, scale_to_zero=True, idle_timeout_s=30, max_loras=8,
                                    tool_call_parser="hermes", adapters=[serving_pb2.LoraModule(name="a")])
    d = spec_from_pb(pb)
    assert (d.replicas, d.scale_to_zero, d.idle_timeout_s, d.max_loras, d.tool_call_parser) == (3, True, 30, 8,
                                                                                                 "hermes")
    back = spec_to_pb(d)
    assert (back.replicas, back.scale_to_zero, back.max_loras, back.adapters[0].name) == (3, True, 8, "a")
    assert spec_from_pb(serving_pb2.DeploymentSpec(name="d")).replicas == 1  # unset: one replica


def test_serve_options_scale_to_zero_and_a_version_per_fixed_config():
    d = DeploymentSpec(name="d", replicas=2, scale_to_zero=True, idle_timeout_s=45, served_name="m",
                       max_loras=4, max_lora_rank=16)
    scaling = job.scale_to_zero(d)
    assert scaling["min_replicas"] == 0 and scaling["initial_replicas"] == 0 and scaling["max_replicas"] == 2
    assert scaling["downscale_to_zero_delay_s"] == 45
    one = ServeJobSpec(action="deploy", deployment=d)
    two = ServeJobSpec(action="adapters", deployment=d.model_copy(update={
        "adapters": [LoraModule(name="x")]}))
    # the adapters are the user_config: they change it, never the replicas' fixed config
    assert job.replica_config(one, "k") == job.replica_config(two, "k")
    assert job.user_config(two.deployment) == {"adapters": {"x": {"uri": "", "sha256": ""}}}
    assert job.replica_config(one, "k")["max_lora_rank"] == 16


def test_runtime_lora_server_arguments_and_key():
    s = ServerSpec(model_dir="/m", served_name="m", runtime_lora=True, max_loras=4, max_lora_rank=32, api_key="k")
    cmd = server_command(s, 9000, "python")
    i = cmd.index("--enable-lora")
    assert cmd[i:i + 5] == ["--enable-lora", "--max-lora-rank", "32", "--max-loras", "4"]
    assert "--lora-modules" not in cmd and "k" not in cmd  # the key is not in argv (ps shows argv)
    env = server_env(s, {})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_API_KEY"] == "k"
    assert "VLLM_API_KEY" not in server_env(ServerSpec(model_dir="/m", served_name="m"), {"VLLM_API_KEY": "x"})
