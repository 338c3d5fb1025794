"""The streaming merge (services/merging/merge.py) and the equivalence check (services/merging/equivalence.py)
against PEFT's own merge_and_unload, on tiny models built here: LoRA, DoRA, rsLoRA, rank patterns, modules_to_save,
tied embeddings, an MoE (the router untouched), shards, dtypes; and the check failing on a wrong merge."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

try:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - the control venv collects this file only to skip it
    pytest.skip(f"needs the train venv ({exc}): .venvs/train/bin/python -m pytest {__file__}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from services.merging import equivalence  # noqa: E402
from services.merging.merge import MergeError, base_dtype, load_adapter, merge  # noqa: E402
from services.core.weights import read_file_header  # noqa: E402

FIXTURES = Path(os.environ.get("TUNERY_FIXTURES", ROOT / "build" / "fixtures"))
TINY, MOE = FIXTURES / "tiny-llama", FIXTURES / "tiny-moe"
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json")


def base_copy(src: Path, dest: Path, *, tied: bool = False, dtype=torch.float32) -> Path:
    """A tiny base saved the way transformers saves it (optionally with tied embeddings, or in another dtype)."""
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if tied:
        config = LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(str(dest))
    for name in COMPANIONS:
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    return dest


def adapter_for(base: Path, dest: Path, **lora) -> Path:
    """An adapter with non-zero weights everywhere (init_lora_weights=False: B is random too, so the merge moves
    every targeted weight), saved as PEFT saves it."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=lora.pop("r", 4), lora_alpha=lora.pop("lora_alpha", 8), init_lora_weights=False,
                        lora_dropout=0.0, **lora)
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:  # a trained copy differs from the base's
                p.add_(torch.randn_like(p) * 0.05)
    peft.save_pretrained(str(dest))
    return dest


def reference(base: Path, adapter: Path):
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def merged_model(out: Path, base: Path):
    for name in COMPANIONS:
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def run_merge(base: Path, adapter: Path, out: Path, dtype="fp32", max_shard_bytes=1 << 30):
    out.mkdir()
    return merge(base, load_adapter(adapter), out, dtype, max_shard_bytes)


def logits(model, ids=None):
    ids = ids if ids is not None else torch.tensor([[1, 5, 9, 42, 7, 300, 12, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def tensors(path: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return base_copy(TINY, tmp_path_factory.mktemp("tiny") / "base")


@pytest.mark.parametrize("variant", [
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},  # LoRA
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},                            # DoRA
    {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "r": 8, "lora_alpha": 4},               # rsLoRA
    {"target_modules": ["q_proj", "o_proj"], "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"q_proj": 32}},
    {"target_modules": ["q_proj", "up_proj"], "modules_to_save": ["lm_head"]},                           # saved
    {"target_modules": ["q_proj", "embed_tokens"]},                                                     # embedding
], ids=["lora", "dora", "rslora", "patterns", "modules_to_save", "embedding"])
def test_the_merge_is_peft_merge_and_unload(tiny, tmp_path, variant):
    adapter = adapter_for(tiny, tmp_path / "adapter", **variant)
    result = run_merge(tiny, adapter, tmp_path / "out")
    peft_merged = reference(tiny, adapter).merge_and_unload()
    ours = merged_model(tmp_path / "out", tiny)
    theirs = peft_merged.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(ours), logits(peft_merged), rtol=0, atol=1e-5)
    assert result.merged and not result.untied
    if "modules_to_save" in variant:
        assert result.replaced == ["lm_head.weight"]


def test_untargeted_tensors_are_copied_byte_for_byte_and_the_router_is_untouched(tmp_path):
    moe = base_copy(MOE, tmp_path / "moe")
    adapter = adapter_for(moe, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                      "down_proj"])
    result = run_merge(moe, adapter, tmp_path / "out")
    before, after = tensors(moe), tensors(tmp_path / "out")
    assert set(before) == set(after)
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert routers  # the tiny MoE has a router per layer
    for name in before:
        if name not in result.merged:
            assert torch.equal(before[name], after[name]) and before[name].dtype == after[name].dtype, name
    assert not set(routers) & set(result.merged)
    assert any("shared_expert" in m for m in result.merged)  # expert modules were adapted and merged
    torch.testing.assert_close(logits(merged_model(tmp_path / "out", moe)),
                               logits(reference(moe, adapter).merge_and_unload()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("changed", [{"modules_to_save": ["lm_head"]}, {"target_modules": ["embed_tokens"]}],
                         ids=["lm_head saved", "embedding adapted"])
def test_tied_embeddings_are_untied_when_the_adapter_changes_one_side(tmp_path, changed):
    tied = base_copy(TINY, tmp_path / "tied", tied=True)
    assert "lm_head.weight" not in tensors(tied)  # transformers stores one tensor for the pair
    adapter = adapter_for(tied, tmp_path / "adapter", **{"target_modules": ["q_proj"], **changed})
    result = run_merge(tied, adapter, tmp_path / "out")
    assert result.untied and json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = merged_model(tmp_path / "out", tied)
    # the merged model answers as base + adapter (PEFT's merge_and_unload would fold the change into both sides)
    torch.testing.assert_close(logits(merged), logits(reference(tied, adapter)), rtol=0, atol=1e-5)


def test_shards_are_bounded_and_indexed(tiny, tmp_path):
    adapter = adapter_for(tiny, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    result = run_merge(tiny, adapter, tmp_path / "out", max_shard_bytes=256 << 10)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(result.shards) > 3 and sorted(set(index["weight_map"].values())) == result.shards
    for shard in result.shards:  # valid safetensors, at most the bound, unless one tensor alone is larger
        read_file_header(out / shard)  # every offset checked against dtype, shape and file size
        with safe_open(str(out / shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        body = sum(4 * int(torch.tensor(shape).prod()) for shape in sizes)
        assert body <= 256 << 10 or len(sizes) == 1, (shard, body, len(sizes))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    torch.testing.assert_close(logits(merged_model(out, tiny)), logits(reference(tiny, adapter)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_output_dtype_and_the_check_in_that_dtype(tiny, tmp_path, dtype, torch_dtype):
    adapter = adapter_for(tiny, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    run_merge(tiny, adapter, tmp_path / "out", dtype=dtype)
    out = tmp_path / "out"
    assert {t.dtype for t in tensors(out).values()} == {torch_dtype}
    assert base_dtype(out) == dtype and base_dtype(tiny) == "fp32"
    for name in COMPANIONS:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    figures = equivalence.check(tiny, adapter, out, equivalence.FIXED_PROMPTS[:4], dtype, greedy_tokens=8)
    print(f"\n{dtype}: max |Δlogit| {figures['max_abs_logit_diff']:.4f}, mean KL {figures['mean_kl']:.2e}, "
          f"greedy identical {figures['greedy_identical']}/{figures['prompts']}")
    assert figures["passed"], figures["failures"]


def test_the_check_passes_a_right_merge_and_fails_a_wrong_one(tiny, tmp_path):
    adapter = adapter_for(tiny, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "o_proj"])
    out = tmp_path / "out"
    run_merge(tiny, adapter, out)
    for name in COMPANIONS:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    right = equivalence.check(tiny, adapter, out, equivalence.FIXED_PROMPTS[:4], "fp32", greedy_tokens=8)
    print(f"\nfp32: max |Δlogit| {right['max_abs_logit_diff']:.2e}, mean KL {right['mean_kl']:.2e}")
    assert right["passed"] and right["greedy_identical"] == 4 and right["max_abs_logit_diff"] < 1e-3
    # a merge that forgot one module's adapter: the check names the first prompt that differs
    from safetensors.torch import load_file, save_file

    [shard] = sorted(out.glob("model-*.safetensors"))
    weights = load_file(str(shard))
    weights["model.layers.0.self_attn.o_proj.weight"] = tensors(tiny)["model.layers.0.self_attn.o_proj.weight"]
    save_file(weights, str(shard), metadata={"format": "pt"})
    wrong = equivalence.check(tiny, adapter, out, equivalence.FIXED_PROMPTS[:4], "fp32", greedy_tokens=8)
    assert not wrong["passed"] and wrong["failures"][0]["prompt"] == 0
    assert any("logits differ" in w for w in wrong["failures"][0]["why"])


def test_an_adapter_the_checkpoint_cannot_take_is_refused(tiny, tmp_path):
    moe = base_copy(MOE, tmp_path / "moe")
    adapter = adapter_for(moe, tmp_path / "adapter", target_modules=["shared_expert_gate", "q_proj"])
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="does not hold"):
        merge(tiny, load_adapter(adapter), tmp_path / "out", "fp32", 1 << 30)


def test_probe_conversations_come_from_the_held_out_split(tmp_path):
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                               for i in range(5)))
    assert equivalence.probe_conversations(holdout, 3) == [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    assert equivalence.probe_conversations(None, 2) == equivalence.FIXED_PROMPTS[:2]


def test_the_check_runs_where_the_worker_has_a_gpu():
    assert equivalence.check_device(cuda_available=True) == "cuda"
    assert equivalence.check_device(cuda_available=False) == "cpu"
    assert equivalence.check_device() == ("cuda" if torch.cuda.is_available() else "cpu")
