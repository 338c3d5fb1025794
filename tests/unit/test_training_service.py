"""TrainingService's validation, planning and queueing over a fake runner and a local store; the spec's run key;
target-module presets; the SDK's YAML -> proto conversion and the servicer's proto -> spec conversion."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from services.core.artifacts import ArtifactStore
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.jobs import SubmitOptions
from services.core.specs import parse
from services.core.store import LocalObjectStore
from services.gen.tunery.v1 import training_pb2
from services.sdk.client import training_spec
from services.training import targets
from services.training.service import TrainingService, TrainingSettings
from services.training.servicer import spec_from_pb
from services.training.spec import TrainingJobSpec
from tests.fakes import FakeRunner

CONFIGS = Path(__file__).parent / "configs"
RECIPES = Path(__file__).resolve().parents[2] / "services" / "training" / "recipes"
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
        "vocab_size": 1000, "max_position_embeddings": 512, "tie_word_embeddings": False}
LLAMA_LINEAR = ["down_proj", "embed_tokens", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture
def env(tmp_path):
    store = ArtifactStore(LocalObjectStore(tmp_path / "s"), "p")
    runner = FakeRunner(store)
    svc = TrainingService(store, runner, TrainingSettings(project="p", port=0))

    def art(kind, name, files=None, **meta):
        w = store.writer(kind, name)
        for path, data in (files or {"f.json": b"{}"}).items():
            w.add_bytes(data, path)
        return w.commit(meta)[0].ref()

    def model(config=TINY, **meta):
        meta = {"is_causal_lm": True, "architecture": config["architectures"][0], "linear_modules": LLAMA_LINEAR,
                "max_position_embeddings": config.get("max_position_embeddings", 0), **meta}
        # the metadata as a file too, so models that differ only in metadata are distinct artifacts
        return art("model", "m", {"config.json": json.dumps(config).encode(),
                                  "meta.json": json.dumps(meta, sort_keys=True).encode()}, **meta)

    data = art("dataset", "d", {"train.jsonl": b"{}\n", "holdout.jsonl": b"{}\n"}, stage="prepared", num_train=1)
    return svc, runner, art, model, data


def request(raw, preset=""):
    """A request as the servicer hands it over: the typed spec (a module preset in lora.preset)."""
    if preset:
        raw = {**raw, "lora": {**raw.get("lora", {}), "preset": preset}}
    return parse(TrainingJobSpec, raw)


def submit(svc, raw, preset="", **options):
    return asyncio.run(svc.submit(request(raw, preset), SubmitOptions(**options)))


def plan(svc, raw, preset=""):
    return asyncio.run(svc.plan(request(raw, preset)))


def req(model, data, **over):
    return {"base_model": model.model_dump(), "dataset": data.model_dump(), **over}


def test_a_valid_request_is_queued_in_the_train_role_with_resolved_targets(env):
    svc, runner, _, model, data = env
    m = model()
    job = submit(svc, req(m, data, max_steps=5), key="t-1")
    r = runner.submitted[0]
    assert job.id == "t-1" and r.kind == "training.sft" and r.role == "train" and r.service == "training"
    spec = TrainingJobSpec.model_validate(r.spec)
    assert spec.lora.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert spec.base_model.sha256 == m.sha256 and spec.name == "m-lora"
    assert r.resources.cpus == 1.0 and r.resources.gpus == 0 and spec.worker_gpus == 0
    assert spec.planned_peak_gib > 0


def test_attention_preset_and_explicit_names(env):
    svc, runner, _, model, data = env
    m = model()
    submit(svc, req(m, data), preset="attention")
    assert runner.submitted[-1].spec["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    submit(svc, req(m, data, lora={"target_modules": ["v_proj", "q_proj"]}))
    assert runner.submitted[-1].spec["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("over,err,text", [
    ({"method": "full"}, InvalidArgument, "spec.method: 'full' is not one of lora, qlora, dora"),
    ({"lora": {"rank": 0}}, InvalidArgument, "spec.lora.rank: must be > 0"),
    ({"lora": {"rank": -4}}, InvalidArgument, "spec.lora.rank"),
    ({"optimizer": {"learning_rate": 0.0}}, InvalidArgument, "spec.optimizer.learning_rate: must be in"),
    ({"optimizer": {"learning_rate": 0.2}}, InvalidArgument, "spec.optimizer.learning_rate"),
    ({"lora": {"target_modules": ["q_proj", "c_attn"]}}, InvalidArgument, "c_attn not found in this architecture"),
    ({"max_seq_len": 4096}, InvalidArgument, "longer than the model's context of 512"),
    ({"micro_batch_size": 0}, InvalidArgument, "spec.micro_batch_size"),
    ({"device": "cuda"}, FailedPrecondition, "no GPU"),
])
def test_bad_requests_are_refused_before_queueing(env, over, err, text):
    svc, runner, _, model, data = env
    with pytest.raises(err, match=text.replace("(", r"\(")):
        submit(svc, req(model(), data, **over))
    assert runner.submitted == []


def test_inputs_that_cannot_be_trained(env):
    svc, runner, art, model, data = env
    raw = art("dataset", "raw", stage="raw")
    with pytest.raises(FailedPrecondition, match="raw import, not a prepared dataset"):
        submit(svc, req(model(), raw))
    no_train = art("dataset", "odd", {"holdout.jsonl": b"{}\n"}, stage="prepared", num_train=0)
    with pytest.raises(FailedPrecondition, match="no train split"):
        submit(svc, req(model(), no_train))
    bert = model({**TINY, "architectures": ["BertModel"]}, is_causal_lm=False)
    with pytest.raises(FailedPrecondition, match="BertModel, not a causal LM"):
        submit(svc, req(bert, data))
    with pytest.raises(FailedPrecondition, match="already quantized"):
        submit(svc, req(model(form="quantized"), data))
    with pytest.raises(FailedPrecondition, match="is a dataset artifact, not a model"):
        submit(svc, req(data, data))
    with pytest.raises(InvalidArgument, match="spec.dataset: is required"):
        submit(svc, {"base_model": model().model_dump()})
    assert runner.submitted == []


def test_qlora_where_bitsandbytes_cannot_run(env):
    svc, runner, _, model, data = env
    svc.settings = svc.settings.model_copy(update={"bitsandbytes_devices": "cuda"})
    with pytest.raises(FailedPrecondition, match="QLoRA needs bitsandbytes 4-bit on cpu"):
        submit(svc, req(model(), data, method="qlora"))
    assert runner.submitted == []
    submit(svc, req(model(), data, method="lora"))  # the same request as LoRA is fine


def llama_8b(model):
    config = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    return model(config, max_position_embeddings=config["max_position_embeddings"], parameters=8_030_261_248)


def test_too_big_for_the_gpus_is_refused_with_what_to_change(env):
    svc, runner, _, model, data = env
    runner.cluster = [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:T4": 1.0}]  # one 16 GB T4
    m = llama_8b(model)
    with pytest.raises(FailedPrecondition, match=r"needs ~\d+\.\d GiB per GPU, largest GPU has 16\.0 GiB.*qlora"):
        submit(svc, req(m, data, max_seq_len=2048, micro_batch_size=4))
    assert runner.submitted == []
    p = plan(svc, req(m, data, method="qlora", max_seq_len=512, micro_batch_size=1, gradient_checkpointing=True))
    assert p.fit.feasible and p.estimate.peak_gib < 16
    job = submit(svc, req(m, data, method="qlora", max_seq_len=512, micro_batch_size=1, gradient_checkpointing=True))
    assert job.resources.gpus == 1.0 and runner.submitted[-1].spec["worker_gpus"] == 1.0


def test_gpu_memory_from_settings_and_worker_count(env):
    svc, runner, _, model, data = env
    runner.cluster = [{"CPU": 8.0, "GPU": 2.0}]  # size unknown to Ray
    p = plan(svc, req(model(), data))
    assert p.notes and "TUNERY_TRAINING_GPU_MEMORY_GIB" in p.notes[0]
    svc.settings = svc.settings.model_copy(update={"gpu_memory_gib": 24.0})
    p = plan(svc, req(model(), data, num_workers=2))
    assert p.fit.feasible and p.resources.cpus == 0.5 and p.resources.gpus == 0  # the workers hold the GPUs
    p = plan(svc, req(model(), data, num_workers=3))
    assert not p.fit.feasible and "fewer workers" in " ".join(p.fit.suggestions)


def test_run_key_ignores_operational_fields_only():
    base = TrainingJobSpec(base_model={"uri": "m"}, dataset={"uri": "d"}, name="a")
    same = base.model_copy(update={"name": "b", "keep_checkpoints": 9, "checkpoint_every_steps": 7,
                                   "worker_cpus": 3.0})
    assert base.run_key() == same.run_key() and base.checkpoint_name("j1") == same.checkpoint_name("j2")
    assert base.model_copy(update={"seed": 1}).run_key() != base.run_key()
    assert base.model_copy(update={"lora": base.lora.model_copy(update={"rank": 4})}).run_key() != base.run_key()
    fresh = base.model_copy(update={"fresh_start": True})
    assert fresh.checkpoint_name("j1") != fresh.checkpoint_name("j2") != base.checkpoint_name("j1")
    assert fresh.checkpoint_name("j1").startswith(base.checkpoint_name("j1"))


def test_target_presets():
    moe = ["down_proj", "embed_tokens", "gate", "k_proj", "lm_head", "o_proj", "q_proj", "shared_expert_gate",
           "up_proj", "v_proj", "gate_proj"]
    assert "gate" not in targets.resolve("all-linear", [], moe)  # MoE routers are never adapted
    assert "shared_expert_gate" not in targets.resolve("", [], moe) and "lm_head" not in targets.resolve("", [], moe)
    assert targets.resolve("attention", [], ["c_attn", "c_fc", "wte"]) == ["c_attn"]
    with pytest.raises(InvalidArgument, match="the attention preset matches none"):
        targets.resolve("attention", [], ["fc1", "fc2"])
    with pytest.raises(InvalidArgument, match="'mlp' is not one of"):
        targets.resolve("mlp", [], moe)


def test_yaml_recipes_load_into_specs():
    """Every shipped recipe parses into the proto, converts back into the typed spec and validates."""
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"smoke", "lora", "qlora", "dora"}
    for path in recipes:
        d = yaml.safe_load(path.read_text())
        pb_spec = training_spec({**d, "base_model": "model-x", "dataset": "dataset-y"})
        spec = spec_from_pb(pb_spec)
        assert spec.method == d["method"] and spec.lora.preset == d["lora"].get("preset", "")
        assert spec.lora.rank == d["lora"]["rank"] and spec.optimizer.learning_rate == d["optimizer"]["learning_rate"]
        if d["method"] == "qlora":
            assert spec.qlora.compute_dtype == d["qlora"]["compute_dtype"] and spec.qlora.double_quant


def test_proto_conversion_keeps_explicit_zero_rank_and_refuses_unknown_enums():
    s = training_spec({"base_model": "m", "dataset": "d", "lora": {"rank": 0}})
    with pytest.raises(InvalidArgument, match="spec.lora.rank: must be > 0"):  # optional: an explicit 0 is refused,
        spec_from_pb(s)                                                       # not defaulted
    # an enum number outside the enum (a newer client's, or a fuzzer's) names its field, never a KeyError
    for field, value in (("method", 42), ("strategy", 7), ("precision", 70)):
        s = training_spec({"base_model": "m", "dataset": "d"})
        setattr(s, field, value)
        with pytest.raises(InvalidArgument) as e:
            spec_from_pb(s)
        assert [v.field for v in e.value.violations] == [f"spec.{field}"] and str(value) in str(e.value)
    s = training_spec({"base_model": "m", "dataset": "d"})
    s.qlora.compute_dtype = 99
    with pytest.raises(InvalidArgument, match="spec.qlora.compute_dtype"):
        spec_from_pb(s)
    empty = spec_from_pb(training_pb2.TrainingSpec())  # every field defaulted; the service says what is required
    assert empty == TrainingJobSpec() and not empty.base_model.uri


def test_cpu_workers_that_cannot_be_placed_are_refused_with_the_reason(env):
    """The outside finding: `--set num_workers=2` on the 2-CPU embedded stack hung at RUNNING (the driver's 0.5 CPU
    plus 2 workers x 1 CPU on one node), until killed after 290 s."""
    svc, runner, _, model, data = env
    runner.cluster = [{"CPU": 2.0, "memory": 8 * 2**30}]
    p = plan(svc, req(model(), data, num_workers=2))
    assert not p.fit.feasible
    assert p.fit.reason == ("asks for 2 workers × 1 CPU + 0.5 for the driver on one node (2.5 CPUs); the largest "
                            "node has 2 CPUs")
    assert "at most 1 workers" in p.fit.suggestions
    with pytest.raises(FailedPrecondition, match="the largest node has 2 CPUs"):
        submit(svc, req(model(), data, num_workers=2))
    assert not runner.submitted
    # the same job fits a node with room for it, and with half-CPU workers on this one
    runner.cluster = [{"CPU": 2.0}, {"CPU": 4.0}]
    assert plan(svc, req(model(), data, num_workers=2)).fit.feasible
    runner.cluster = [{"CPU": 2.0}]
    svc.settings = svc.settings.model_copy(update={"cpus_per_worker": 0.5})
    assert plan(svc, req(model(), data, num_workers=2)).fit.feasible
