"""The configs the training job builds, per device: the CUDA path is the CPU path with other arguments, so what
it would hand to bitsandbytes, PEFT and TRL on a GPU is checked here without one. Also the loss masks.

Runs with the train venv: .venvs/train/bin/python -m pytest tests/unit/train/test_sft_configs.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(f"needs the train venv ({exc})", allow_module_level=True)

from services.training import sft
from services.training.spec import TrainingJobSpec

os.environ["HF_HUB_OFFLINE"] = "1"
FIXTURE = Path(os.environ.get("TUNERY_FIXTURES", Path(__file__).resolve().parents[3] / "build" / "fixtures"))


def spec(**over) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate({"base_model": {"uri": "m"}, "dataset": {"uri": "d"}, "name": "n", **over})


def test_device_and_dtype_selection():
    assert sft.select_device("cpu") == "cpu"
    assert sft.select_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            sft.select_device("cuda")
    assert sft.compute_dtype("auto", "cpu") == torch.float32
    assert sft.compute_dtype("auto", "cuda", bf16_supported=True) == torch.bfloat16
    assert sft.compute_dtype("auto", "cuda", bf16_supported=False) == torch.float16  # T4, V100
    assert sft.compute_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cuda", torch.bfloat16)])
def test_qlora_bitsandbytes_config(device, dtype):
    cfg = sft.bnb_config(spec(method="qlora"), device, dtype)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == dtype and cfg.bnb_4bit_quant_storage == torch.uint8
    fsdp = sft.bnb_config(spec(method="qlora", num_workers=2, strategy="fsdp"), device, dtype)
    assert fsdp.bnb_4bit_quant_storage == dtype  # FSDP shards one dtype
    fp4 = sft.bnb_config(spec(method="qlora", qlora={"quant_type": "fp4", "double_quant": False,
                                                     "compute_dtype": "fp16"}), device, dtype)
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.float16
    assert sft.bnb_config(spec(method="lora"), device, dtype) is None


def test_peft_config():
    c = sft.peft_config(spec(method="dora", lora={"rank": 4, "alpha": 8, "dropout": 0.1,
                                                  "target_modules": ["q_proj", "v_proj"], "use_rslora": True}))
    assert c.r == 4 and c.lora_alpha == 8 and c.lora_dropout == 0.1 and c.use_dora and c.use_rslora
    assert set(c.target_modules) == {"q_proj", "v_proj"} and c.task_type == "CAUSAL_LM"
    assert not sft.peft_config(spec()).use_dora


def test_trainer_config_per_device(tmp_path):
    s = spec(max_steps=7, packing=True, gradient_checkpointing=True, checkpoint_every_steps=3, keep_checkpoints=2,
             eval_every_steps=5, tracking={"backend": "mlflow", "project": "p", "uri": "http://m:5000"})
    cpu = sft.sft_config(s, tmp_path, "cpu", torch.float32, has_eval=True)
    assert cpu.use_cpu and not cpu.bf16 and cpu.max_steps == 7 and cpu.packing and cpu.padding_free
    assert cpu.save_steps == 3 and cpu.save_total_limit == 2 and cpu.eval_steps == 5
    assert cpu.gradient_checkpointing and cpu.report_to == ["tensorboard", "mlflow"]
    assert sft.tracking_env(s) == {"MLFLOW_EXPERIMENT_NAME": "p", "MLFLOW_TRACKING_URI": "http://m:5000"}
    # TrainingArguments refuses bf16 on a machine without a GPU, so the GPU path is checked as the arguments
    gpu = sft.sft_kwargs(s.model_copy(update={"num_workers": 2}), tmp_path, "cuda", torch.bfloat16, has_eval=False)
    assert gpu["bf16"] and not gpu["use_cpu"] and gpu["ddp_backend"] == "nccl" and gpu["eval_strategy"] == "no"
    fp16 = sft.sft_kwargs(s, tmp_path, "cuda", torch.float16, has_eval=True)
    assert fp16["fp16"] and not fp16["bf16"] and fp16["ddp_backend"] is None
    qlora = sft.sft_kwargs(s.model_copy(update={"method": "qlora"}), tmp_path, "cuda", torch.bfloat16, has_eval=True)
    assert not qlora["bf16"]  # the 4-bit layers compute in the BitsAndBytesConfig's dtype, no autocast
    cpu2 = sft.sft_kwargs(s.model_copy(update={"num_workers": 2, "strategy": "fsdp"}), tmp_path, "cpu",
                          torch.float32, has_eval=False)  # FSDP args need a process group to construct
    assert cpu2["ddp_backend"] == "gloo" and cpu2["fsdp"] == "full_shard auto_wrap"


def test_loss_masks_cover_the_assistant_turns_only():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE / "tiny-llama")
    ex = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                       {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 plus 3?"},
                       {"role": "assistant", "content": "6."}], "tools": None}
    marked = sft.tokenize_example(tok, ex, assistant_markers=True)
    trained = tok.decode([t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m])
    assert "4." in trained and "6." in trained and "plus" not in trained and "brief" not in trained
    last_only = sft.tokenize_example(tok, ex, assistant_markers=False)
    trained = tok.decode([t for t, m in zip(last_only["input_ids"], last_only["assistant_masks"]) if m])
    assert "6." in trained and "4." not in trained and "plus" not in trained
    pref = {"messages": [{"role": "user", "content": "Say hi"}], "tools": None,
            "preference": {"chosen": [{"role": "assistant", "content": "Hello there"}],
                           "rejected": [{"role": "assistant", "content": "No"}]}}
    out = sft.tokenize_example(tok, pref, assistant_markers=True)
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert "Hello there" in trained and "No" not in trained  # preference rows train on the chosen answer


def test_qlora_loads_the_base_in_4bit_on_this_cpu():
    import bitsandbytes as bnb

    model, dtype = sft.load_model(FIXTURE / "tiny-llama", spec(method="qlora"), "cpu")
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14  # 7 projections x 2 layers, each under its LoRA wrapper
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 16 * 2048 * 2  # r=16 on every linear: r * sum(in + out) per layer x 2 layers


def test_packed_micro_batch_counts_examples():
    s = spec(packing=True, micro_batch_size=8, max_seq_len=512)
    assert sft.packed_micro_batch(s, 128.0) == 2  # 8 examples of ~128 tokens fill 2 rows of 512
    assert sft.packed_micro_batch(s, 40.0) == 1  # never below one row
    assert sft.packed_micro_batch(s, 900.0) == 8  # examples longer than a row: one row each
    assert sft.packed_micro_batch(spec(micro_batch_size=8), 128.0) == 8  # no packing: unchanged


def test_kernels_are_chosen_by_device(monkeypatch):
    """The GPU levers (FlashAttention-2 varlen for padding-free packed rows, Liger's RMSNorm/RoPE/SwiGLU kernels)
    are chosen by device and by what is installed; on CPU neither: sdpa, no Liger. The choice reaches the model
    loader and SFTConfig."""
    everything = lambda module: True  # noqa: E731 - a CUDA worker with flash-attn and liger-kernel installed
    nothing = lambda module: False  # noqa: E731
    cpu = sft.select_kernels("cpu", "llama", torch.float32, packing=True, available=everything)
    assert (cpu.attn_implementation, cpu.use_liger_kernel) == (None, False) and "CPU" in cpu.why
    gpu = sft.select_kernels("cuda", "llama", torch.bfloat16, packing=True, available=everything)
    assert (gpu.attn_implementation, gpu.use_liger_kernel) == ("flash_attention_2", True), gpu
    padded = sft.select_kernels("cuda", "llama", torch.bfloat16, packing=False, available=everything)
    assert padded.attn_implementation is None and padded.use_liger_kernel  # varlen only pays for packed rows
    fp32 = sft.select_kernels("cuda", "qwen2", torch.float32, packing=True, available=everything)
    assert fp32.attn_implementation is None  # FlashAttention needs bf16/fp16
    bare = sft.select_kernels("cuda", "llama", torch.bfloat16, packing=True, available=nothing)
    assert (bare.attn_implementation, bare.use_liger_kernel) == (None, False)
    assert "flash-attn not installed" in bare.why and "liger-kernel not installed" in bare.why
    other = sft.select_kernels("cuda", "gpt2", torch.bfloat16, packing=True, available=everything)
    assert not other.use_liger_kernel and "gpt2 not supported" in other.why
    # this machine: what fit() picks for the fixture on the device it selects
    here = sft.select_kernels(sft.select_device("auto"), sft.model_type(FIXTURE / "tiny-llama"), torch.float32,
                              packing=True)
    assert here.attn_implementation is None and (torch.cuda.is_available() or not here.use_liger_kernel)
    s = spec(packing=True)
    assert sft.sft_kwargs(s, Path("/tmp/x"), "cuda", torch.bfloat16, has_eval=False, kernels=gpu)["use_liger_kernel"]
    assert not sft.sft_kwargs(s, Path("/tmp/x"), "cpu", torch.float32, has_eval=False, kernels=cpu)["use_liger_kernel"]
    model, _ = sft.load_model(FIXTURE / "tiny-llama", s, "cpu", cpu)
    assert model.get_base_model().config._attn_implementation == "sdpa"  # transformers' default for Llama
    chosen = {}

    def spy(*args, **kwargs):
        chosen.update(kwargs)
        raise RuntimeError("stop here")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        sft.load_model(FIXTURE / "tiny-llama", s, "cpu", gpu)
    assert chosen["attn_implementation"] == "flash_attention_2"  # what a CUDA worker's loader is handed
