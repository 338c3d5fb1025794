"""QuantizationService's checks over a fake runner and a local store, reading only the safetensors headers: the
ignore list built from the architecture (lm_head, MoE routers and gates, vision modules), the group size, the
calibration data found through lineage, the memory plan, and each refusal with its status; the servicer's
proto -> spec conversion; the job's device-selected workaround."""

from __future__ import annotations

import json

import pytest

from services.core.artifacts import ArtifactStore
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.store import LocalObjectStore
from services.gen.tunery.v1 import quantization_pb2 as qpb
from services.quantization import architecture
from services.quantization.job import agreement, sample_conversations, skip_pinning
from services.quantization.schemes import SCHEMES, recipe_args
from services.quantization.service import QuantizationService, QuantizationSettings
from services.quantization.servicer import spec_from_pb
from services.quantization.spec import QuantizeSpec
from tests.fakes import FakeRunner
from tests.modeldirs import write_safetensors
from tests.session import fixture_model

pytestmark = pytest.mark.unit


def llama(hidden=256, inter=512, layers=2, vocab=1000):
    t = {"model.embed_tokens.weight": ("BF16", [vocab, hidden]), "lm_head.weight": ("BF16", [vocab, hidden])}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": ("BF16", [hidden, hidden]),
              p + "self_attn.o_proj.weight": ("BF16", [hidden, hidden]),
              p + "mlp.up_proj.weight": ("BF16", [inter, hidden]),
              p + "mlp.down_proj.weight": ("BF16", [hidden, inter]),
              p + "input_layernorm.weight": ("BF16", [hidden])}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab}, t


def mixtral(hidden=128, experts=4):
    config, t = llama(hidden, 256)
    config |= {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts}
    for i in range(2):
        t[f"model.layers.{i}.block_sparse_moe.gate.weight"] = ("BF16", [experts, hidden])
        for e in range(experts):
            t[f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"] = ("BF16", [256, hidden])
    return config, t


@pytest.fixture
def env(tmp_path):
    store = ArtifactStore(LocalObjectStore(tmp_path / "s"), "p")
    runner = FakeRunner(store)
    svc = QuantizationService(store, runner, QuantizationSettings(project="p", port=0))

    def model(config_tensors, name="m", metadata=None, parents=()):
        config, tensors = config_tensors
        d = tmp_path / f"model-{name}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        write_safetensors(d / "model.safetensors", tensors)
        w = store.writer("model", name, parents=parents)
        list(w.add_dir(d))
        return w.commit({"architecture": config["architectures"][0], **(metadata or {})})[0]

    def dataset(name="data", stage="prepared", rows=20, parents=()):
        w = store.writer("dataset", name, parents=parents)
        lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                          {"role": "assistant", "content": f"a{i}"}]}) for i in range(rows)]
        w.add_bytes("\n".join(lines).encode(), "train.jsonl" if stage == "prepared" else "raw.jsonl")
        return w.commit({"stage": stage})[0]

    return svc, store, runner, model, dataset


def plan(svc, m, scheme="gptq-w4a16", **kw):
    return svc.plan(QuantizeSpec(model=m.ref(), scheme=scheme, **kw))


def test_the_ignore_list_keeps_lm_head_routers_and_gates_from_the_checkpoint():
    """On the real tiny MoE fixture (Qwen2-MoE): each layer's router (mlp.gate, 4 experts x 128) and the shared
    expert's gate (1 x 128), found by name and shape, as one pattern per kind; none of the experts' Linears."""
    from services.core.weights import read_header

    d = fixture_model("tiny-moe")
    with open(d / "model.safetensors", "rb") as f:
        tensors = read_header(lambda o, n: (f.seek(o), f.read(n))[1], (d / "model.safetensors").stat().st_size, "x")
    arch = architecture.read(json.loads((d / "config.json").read_text()), tensors)
    assert arch.num_experts == 4
    assert arch.routers == ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate",
                            "model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"]
    ignore = arch.always_ignored()
    assert ignore == ["lm_head", r"re:model\.layers\.\d+\.mlp\.gate$", r"re:model\.layers\.\d+\.mlp\.shared_expert_gate$"]
    kept = set(arch.linears) - set(arch.quantized(ignore))
    assert kept == set(arch.routers)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in arch.quantized(ignore)  # an FFN, not a gate
    assert "model.layers.1.mlp.experts.3.up_proj" in arch.quantized(ignore)


def test_routers_by_shape_and_vision_modules_by_name():
    config, t = mixtral()
    t["model.layers.0.moe.router_odd_name.weight"] = ("BF16", [4, 128])  # not a known name: found by its shape
    t["vision_tower.blocks.0.attn.qkv.weight"] = ("BF16", [384, 128])
    t["multi_modal_projector.linear_1.weight"] = ("BF16", [128, 128])
    arch = architecture.read(config, {n: _info(n, s) for n, s in t.items()})
    assert "model.layers.0.moe.router_odd_name" in arch.routers
    assert "model.layers.1.block_sparse_moe.gate" in arch.routers
    assert not any("experts" in r for r in arch.routers)
    assert arch.vision == ["multi_modal_projector.linear_1", "vision_tower.blocks.0.attn.qkv"]
    ignore = arch.always_ignored()
    assert r"re:vision_tower\.blocks\.\d+\.attn\.qkv$" in ignore and "multi_modal_projector.linear_1" in ignore
    assert not any(architecture.matches(e, "model.layers.0.block_sparse_moe.experts.1.w1") for e in ignore)


def _info(name, spec):
    from services.core.weights import TensorInfo

    dtype, shape = spec
    n = 2
    for d in shape:
        n *= d
    return TensorInfo(name, dtype, tuple(shape), 0, n)


def test_a_plan_resolves_everything_the_job_needs(env):
    svc, store, runner, model, dataset = env
    base = model(llama(), "base")
    data = dataset("style", parents=[base.ref()])
    adapter_w = store.writer("adapter", "ad", parents=[base.ref(), data.ref()])
    adapter_w.add_bytes(b"x", "adapter_model.safetensors")
    adapter = adapter_w.commit({})[0]
    merged = model(llama(), "merged", {"form": "merged"}, parents=[base.ref(), adapter.ref()])
    p = plan(svc, merged)
    s = p.spec
    assert s.calibration_dataset.uri == data.uri and "lineage" in s.calibration_source  # the training data
    assert s.group_size == 128 and s.resolved_ignore == ["lm_head"] and s.name == "merged-gptq-w4a16"
    assert p.quantized_modules == 8 and len(p.arch.linears) == 8
    assert s.planned_peak_bytes == p.memory.peak > p.memory.process
    assert p.memory.hessians == 3 * 256 * 256 * 4 + 512 * 512 * 4  # q, o, up (256 wide) and down (512 wide)
    assert p.memory.activations == 2 * 256 * 512 * 256 * 4  # 256 samples x 512 tokens x 256 wide, in and out
    assert p.output_bytes < p.memory.model_bytes
    assert runner.jobs == {}  # a plan queues nothing


def test_the_group_size_is_chosen_or_refused_by_the_layer_widths(env):
    svc, store, runner, model, dataset = env
    data = dataset()
    smol = model(llama(hidden=576, inter=1536), "smol")  # SmolLM2-135M's widths: 576 is not a multiple of 128
    assert plan(svc, smol, calibration_dataset=data.ref()).spec.group_size == 64
    with pytest.raises(InvalidArgument) as e:
        plan(svc, smol, calibration_dataset=data.ref(), group_size=128)
    assert "spec.group_size" in str(e.value) and "input widths 576 (6 layers" in str(e.value) and "give 64" in str(e.value)
    with pytest.raises(InvalidArgument, match="per channel"):
        plan(svc, smol, "w8a8-int8", calibration_dataset=data.ref(), group_size=64)


def test_refusals_say_what_to_do(env):
    svc, store, runner, model, dataset = env
    base = model(llama(), "base")
    data, raw = dataset(), dataset("raw", stage="raw")
    with pytest.raises(InvalidArgument, match="spec.scheme.*one of gptq-w4a16"):
        plan(svc, base, "int3")
    with pytest.raises(InvalidArgument, match="calibrates on data.*lineage names no prepared dataset"):
        plan(svc, base)  # a base model: no training data in its lineage
    assert plan(svc, base, "fp8-dynamic").spec.calibration_dataset is None  # data-free
    with pytest.raises(FailedPrecondition, match="has no train split.*prepare it first"):
        plan(svc, base, calibration_dataset=raw.ref())
    with pytest.raises(FailedPrecondition, match="is a dataset artifact, not a model"):
        svc.plan(QuantizeSpec(model=data.ref(), scheme="gptq-w4a16"))
    quantized = model(llama(), "q", {"form": "quantized", "quantization": "compressed-tensors gptq-w4a16"},
                      parents=[base.ref()])
    with pytest.raises(FailedPrecondition, match=f"already quantized.*{base.uri}"):
        plan(svc, quantized, calibration_dataset=data.ref())
    with pytest.raises(InvalidArgument) as e:
        plan(svc, base, calibration_dataset=data.ref(), ignore=["model.layers.0.mlp.gate_proj", "re:.*q_proj$"])
    msg = str(e.value)
    assert "'model.layers.0.mlp.gate_proj'" in msg and "q_proj$" not in msg.split("match no")[0]
    assert "model.layers.N.mlp.up_proj" in msg  # which modules it has
    p = plan(svc, base, calibration_dataset=data.ref(), ignore=["re:.*q_proj$"])
    assert p.quantized_modules == 6 and p.spec.resolved_ignore == ["lm_head", "re:.*q_proj$"]
    with pytest.raises(InvalidArgument, match="llama.cpp chooses each tensor's type"):
        plan(svc, base, "gguf-q4_k_m", ignore=["lm_head"])
    g = plan(svc, base, "gguf-q4_k_m")  # data-free; its peak: the float32 reference and the float32 GGUF
    assert g.spec.calibration_dataset is None and g.memory.resident == g.memory.largest > 0
    assert g.memory.layer == g.memory.hessians == g.memory.activations == 0
    with pytest.raises(FailedPrecondition, match="more than the budget of"):
        plan(svc, base, calibration_dataset=data.ref(), memory_budget_bytes=1 << 20)
    runner.cluster = [{"CPU": 2.0, "memory": 64 * 2**20}]
    with pytest.raises(FailedPrecondition, match="largest node's memory"):
        plan(svc, base, calibration_dataset=data.ref())


def test_the_memory_plan_keeps_weights_beyond_the_resident_budget_on_disk(env):
    svc, store, runner, model, dataset = env
    small = QuantizationService(store, runner, QuantizationSettings(project="p", port=0, resident_weight_bytes=4 << 20))
    big = model(llama(hidden=512, inter=2048, layers=4, vocab=2048), "big")
    m = plan(small, big, "fp8-dynamic").memory
    assert m.resident == 4 << 20 < m.model_bytes
    assert m.hessians == 0 and m.activations == 0  # data-free
    # one layer in float32, twice: q, o (512²), up and down (512 x 2048) and its norm
    assert m.layer == 2 * 4 * (2 * 512 * 512 + 2 * 512 * 2048 + 512)
    assert m.largest == 2048 * 512 * 4  # the embeddings (or lm_head) onloaded in float32
    assert "resident weights" in m.describe() and "on local disk" in m.describe()
    assert plan(svc, big, "fp8-dynamic").memory.resident == m.model_bytes  # fits the default budget: all resident


def test_servicer_converts_the_proto_and_refuses_unknown_enums():
    s = spec_from_pb(qpb.QuantizeSpec(model={"uri": "model-x"}, scheme=qpb.QUANT_SCHEME_W8A8_INT8,
                                      num_calibration_samples=64, ignore=["re:.*o_proj$"], seed=3))
    assert (s.scheme, s.num_calibration_samples, s.calibration_max_seq_len, s.ignore, s.seed) == \
        ("w8a8-int8", 64, 512, ["re:.*o_proj$"], 3)
    assert spec_from_pb(qpb.QuantizeSpec()).scheme == ""
    with pytest.raises(InvalidArgument, match="spec.scheme"):
        spec_from_pb(qpb.QuantizeSpec(scheme=99))


def test_recipes_per_scheme():
    gptq = recipe_args(SCHEMES["gptq-w4a16"], ["lm_head"], 64)["modifiers"]
    assert gptq[0][0] == "GPTQModifier" and gptq[0][1]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    w8 = [name for name, _ in recipe_args(SCHEMES["w8a8-int8"], ["lm_head"], 0)["modifiers"]]
    assert w8 == ["SmoothQuantModifier", "GPTQModifier"]
    assert recipe_args(SCHEMES["fp8-dynamic"], ["lm_head"], 0)["modifiers"][0][1]["scheme"] == "FP8_DYNAMIC"
    assert SCHEMES["fp8-dynamic"].gpu_only_serving and not SCHEMES["gptq-w4a16"].gpu_only_serving


def test_job_helpers(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(50)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    a = sample_conversations(tmp_path / "train.jsonl", 8, seed=1)
    assert len(a) == 8 and a == sample_conversations(tmp_path / "train.jsonl", 8, seed=1)
    assert a != sample_conversations(tmp_path / "train.jsonl", 8, seed=2)
    assert len(sample_conversations(tmp_path / "train.jsonl", 500, seed=1)) == 50
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == (0.5, 0)
    assert agreement([[1, 2], [5]], [[1, 2], [5]]) == (1.0, 2)
    # pinned memory only speeds host-to-GPU copies: skipped where there is no GPU, kept where there is
    assert skip_pinning(cuda_available=False) and not skip_pinning(cuda_available=True)
