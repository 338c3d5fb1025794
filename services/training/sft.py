"""Supervised fine-tuning with TRL's SFTTrainer + PEFT (train environment; imports torch).

The same code runs on CPU and CUDA: `select_device` picks the device, and every config below is built from the
spec plus that device, so the GPU path is the CPU path with other arguments (unit-tested in
tests/unit/train/test_sft_configs.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.jobctx import JobContext
from services.training.spec import TrainingJobSpec

GENERATION_MARKER = "{% generation %}"


# ---------------------------------------------------------------------------------------------- device + dtypes
def select_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("spec.device is cuda but no CUDA device is visible to this worker")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def compute_dtype(precision: str, device: str, bf16_supported: bool | None = None):
    """auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU (CPU bf16 matmuls are slow on AVX2)."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision != "auto":
        return table[precision]
    if device == "cpu":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


# model types whose modules Liger's kernels replace (liger_kernel.transformers: RMSNorm, RoPE, SwiGLU; TRL keeps its
# own fused LM-head loss, so Liger's fused linear cross-entropy stays off)
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen2_moe",
                               "qwen3", "qwen3_moe", "phi3", "granite", "olmo2"})


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Kernels:
    """The attention implementation and fused kernels a run uses, chosen by device (the GPU path is the CPU path
    with these two switches; unit-tested in tests/unit/train/test_sft_configs.py)."""

    attn_implementation: str | None = None  # None: transformers' own choice (sdpa where the model supports it)
    use_liger_kernel: bool = False
    why: str = ""


def select_kernels(device: str, model_type: str, dtype, *, packing: bool, available=installed) -> Kernels:
    """On CUDA: FlashAttention-2's varlen kernel for padding-free packed batches (each packed sequence attends only
    to itself at the cost of its own length; sdpa computes the whole packed row's block-diagonal mask) when
    flash-attn is installed and the compute dtype is bf16/fp16, and Liger's RMSNorm/RoPE/SwiGLU kernels for the
    families it supports when liger-kernel is installed. On CPU neither exists: transformers picks the attention
    (sdpa for the families that have it), no Liger."""
    import torch

    if device != "cuda":
        return Kernels(why="transformers' default attention (sdpa), no fused kernels (CPU)")
    half = dtype in (torch.bfloat16, torch.float16)
    flash = packing and half and available("flash_attn")
    liger = model_type in LIGER_MODEL_TYPES and available("liger_kernel")
    attention = ("flash_attention_2 (varlen, padding-free)" if flash else "sdpa attention"
                 + (" (flash-attn not installed)" if packing and half else ""))
    if liger:
        fused = "Liger kernels"
    elif model_type not in LIGER_MODEL_TYPES:
        fused = f"no Liger ({model_type or 'this model type'} not supported)"
    else:
        fused = "no Liger (liger-kernel not installed)"
    why = f"{attention}, {fused}"
    return Kernels("flash_attention_2" if flash else None, liger, why)


def bnb_config(spec: TrainingJobSpec, device: str, dtype):
    """QLoRA's 4-bit BitsAndBytesConfig (None for lora/dora). Identical on CPU and CUDA but for the compute dtype."""
    if spec.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    cdtype = compute_dtype(spec.qlora.compute_dtype, device) if spec.qlora.compute_dtype != "auto" else dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.qlora.quant_type,
                              bnb_4bit_use_double_quant=spec.qlora.double_quant, bnb_4bit_compute_dtype=cdtype,
                              # FSDP shards only parameters of one dtype: store the 4-bit blocks as the compute dtype
                              **({"bnb_4bit_quant_storage": cdtype} if spec.num_workers > 1 and spec.strategy == "fsdp"
                                 else {}))


def peft_config(spec: TrainingJobSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=list(spec.lora.target_modules) or "all-linear", use_rslora=spec.lora.use_rslora,
                      use_dora=spec.method == "dora", bias="none", task_type="CAUSAL_LM")


def report_to(spec: TrainingJobSpec) -> list[str]:
    """TensorBoard always (its logs ship with the adapter); W&B or MLflow only when the spec asks."""
    return ["tensorboard"] + ([spec.tracking.backend] if spec.tracking.backend else [])


def tracking_env(spec: TrainingJobSpec) -> dict[str, str]:
    t = spec.tracking
    if t.backend == "wandb":
        return {k: v for k, v in {"WANDB_PROJECT": t.project, "WANDB_BASE_URL": t.uri}.items() if v}
    if t.backend == "mlflow":
        return {k: v for k, v in {"MLFLOW_EXPERIMENT_NAME": t.project, "MLFLOW_TRACKING_URI": t.uri}.items() if v}
    return {}


def packed_micro_batch(spec: TrainingJobSpec, mean_tokens: float) -> int:
    """With packing, micro_batch_size counts examples, as without it: a packed row holds ~max_seq_len/mean
    examples, so a step takes max(1, round(micro_batch * mean / max_seq_len)) rows. Keeping examples per step
    keeps the optimizer's schedule (and the loss reached) comparable to the padded run; and on CPU, where the
    attention kernel still computes the full packed row, fewer longer rows is where the padding saving goes."""
    if not spec.packing or mean_tokens <= 0:
        return spec.micro_batch_size
    return max(1, round(spec.micro_batch_size * min(mean_tokens, spec.max_seq_len) / spec.max_seq_len))


def sft_config(spec: TrainingJobSpec, output_dir: Path, device: str, dtype, *, has_eval: bool,
               kernels: Kernels = Kernels()):
    from trl import SFTConfig

    return SFTConfig(**sft_kwargs(spec, output_dir, device, dtype, has_eval=has_eval, kernels=kernels))


def sft_kwargs(spec: TrainingJobSpec, output_dir: Path, device: str, dtype, *, has_eval: bool,
               kernels: Kernels = Kernels()) -> dict[str, Any]:
    """SFTConfig's arguments (kept apart: TrainingArguments refuses GPU settings on a machine without one, and the
    GPU path is still checked here)."""
    import torch

    eval_steps = spec.eval_every_steps or None
    return dict(
        output_dir=str(output_dir),
        seed=spec.seed, data_seed=spec.seed,
        num_train_epochs=spec.epochs, max_steps=spec.max_steps or -1,
        per_device_train_batch_size=spec.micro_batch_size, per_device_eval_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.optimizer.learning_rate, lr_scheduler_type=spec.optimizer.lr_scheduler,
        warmup_steps=spec.optimizer.warmup_steps or spec.optimizer.warmup_ratio,
        weight_decay=spec.optimizer.weight_decay, optim=spec.optimizer.optimizer,
        max_grad_norm=spec.optimizer.max_grad_norm,
        max_length=spec.max_seq_len, packing=spec.packing, packing_strategy="bfd",
        padding_free=spec.packing,
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
        bf16=dtype == torch.bfloat16 and spec.method != "qlora", fp16=dtype == torch.float16 and spec.method != "qlora",
        use_cpu=device == "cpu",
        logging_steps=1, logging_first_step=True, report_to=report_to(spec),
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=spec.checkpoint_every_steps, save_total_limit=spec.keep_checkpoints,
        save_only_model=False,
        dataloader_num_workers=0, remove_unused_columns=True,
        dataset_kwargs={}, dataset_num_proc=None,
        ddp_backend=("nccl" if device == "cuda" else "gloo") if spec.num_workers > 1 else None,
        ddp_find_unused_parameters=False if spec.num_workers > 1 else None,
        fsdp="full_shard auto_wrap" if spec.num_workers > 1 and spec.strategy == "fsdp" else "",
        disable_tqdm=True,
        use_liger_kernel=kernels.use_liger_kernel,
    )


# ---------------------------------------------------------------------------------------------- data
def sft_messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    """A canonical prepared example as the conversation to learn: preference rows train on the chosen answer."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in example["messages"]]
    pref = example.get("preference")
    if pref and pref.get("chosen"):
        messages += [{k: v for k, v in m.items() if v is not None} for m in pref["chosen"]]
    return messages


def tokenize_example(tokenizer, example: dict[str, Any], assistant_markers: bool) -> dict[str, list[int]]:
    """input_ids plus the loss mask: every assistant token when the chat template marks them ({% generation %}),
    else the final assistant turn (prompt -> completion)."""
    messages, tools = sft_messages(example), example.get("tools") or None
    if assistant_markers:
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return {"input_ids": list(out["input_ids"]), "assistant_masks": list(out["assistant_masks"])}
    full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tools=tools, tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    n = len(prompt) if list(full[:len(prompt)]) == list(prompt) else 0
    return {"input_ids": list(full), "assistant_masks": [0] * n + [1] * (len(full) - n)}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Data:
    train: Any
    eval: Any | None
    num_examples: int
    num_tokens: int
    assistant_markers: bool


def load_data(dataset_dir: Path, tokenizer, spec: TrainingJobSpec) -> Data:
    from datasets import Dataset

    template = tokenizer.chat_template or ""
    markers = GENERATION_MARKER in template.replace(" ", "").replace("{%generation%}", GENERATION_MARKER)
    train_rows = [tokenize_example(tokenizer, ex, markers) for ex in read_jsonl(dataset_dir / "train.jsonl")]
    eval_ds = None
    holdout = dataset_dir / "holdout.jsonl"
    if spec.eval_samples and holdout.exists():
        rows = read_jsonl(holdout)
        random.Random(spec.seed).shuffle(rows)
        rows = [tokenize_example(tokenizer, ex, markers) for ex in rows[: spec.eval_samples]]
        eval_ds = Dataset.from_list(rows) if rows else None
    return Data(Dataset.from_list(train_rows), eval_ds, len(train_rows),
                sum(min(len(r["input_ids"]), spec.max_seq_len) for r in train_rows), markers)


# ---------------------------------------------------------------------------------------------- model
def model_type(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str((config.get("text_config") or {}).get("model_type") or config.get("model_type", ""))


def load_model(model_dir: Path, spec: TrainingJobSpec, device: str, kernels: Kernels = Kernels()):
    """The base model (4-bit for QLoRA) wrapped with the LoRA/DoRA adapter, ready for the trainer."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(spec.precision, device)
    quant = bnb_config(spec, device, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if kernels.attn_implementation:
        kwargs["attn_implementation"] = kernels.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    model = get_peft_model(model, peft_config(spec))
    return model, dtype


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def hardware(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def loss_curve_png(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held-out)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def total_steps(num_rows: int, spec: TrainingJobSpec, world_size: int = 1) -> int:
    if spec.max_steps:
        return spec.max_steps
    per_step = spec.micro_batch_size * spec.gradient_accumulation_steps * world_size
    return max(1, math.ceil(num_rows / (spec.micro_batch_size * world_size) / spec.gradient_accumulation_steps
                            * spec.epochs)) if per_step else 1


def fit(ctx: JobContext, spec: TrainingJobSpec, model_dir: Path, data_dir: Path, out: Path,
        resume: Path | None, *, is_main: bool = True) -> dict[str, Any]:
    """Load, wrap and train; returns what save needs. Runs in the driver (one worker) or in each Ray Train
    worker (several): the same code, the trainer finds torch.distributed already set up by Ray Train."""
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    from services.training.callbacks import JobCallback

    device = select_device(spec.device)
    torch.manual_seed(spec.seed)
    os.environ.update(tracking_env(spec))
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_data(data_dir, tokenizer, spec)
    kernels = select_kernels(device, model_type(model_dir), compute_dtype(spec.precision, device),
                             packing=spec.packing)
    model, dtype = load_model(model_dir, spec, device, kernels)
    trainable, total = model.get_nb_trainable_parameters()
    if is_main:
        ctx.event(f"{spec.method} on {device} ({str(dtype).removeprefix('torch.')}): {trainable:,} trainable of "
                  f"{total:,} parameters, modules {', '.join(spec.lora.target_modules) or 'all-linear'}; "
                  f"{data.num_examples} examples, {data.num_tokens:,} tokens, loss on "
                  f"{'every assistant turn' if data.assistant_markers else 'the final assistant turn'}"
                  + (", packed" if spec.packing else "") + f"; {kernels.why}")
    callback = JobCallback(ctx, name=spec.checkpoint_name(ctx.job_id), run_key=spec.run_key(),
                           parents=[spec.base_model, spec.dataset], keep=spec.keep_checkpoints, is_main=is_main)
    rows = packed_micro_batch(spec, data.num_tokens / max(data.num_examples, 1))
    if rows != spec.micro_batch_size and is_main:
        ctx.event(f"packing: {rows} packed row(s) of {spec.max_seq_len} tokens per micro-batch hold about "
                  f"{spec.micro_batch_size} examples")
    run_spec = spec.model_copy(update={"micro_batch_size": rows})
    trainer = SFTTrainer(model=model, args=sft_config(run_spec, out, device, dtype, has_eval=data.eval is not None,
                                                      kernels=kernels),
                         train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                         callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the job's own events replace the printed dicts
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - t0
    if callback.cancel_reason is not None:
        return {"cancelled": callback.cancel_reason, "step": trainer.state.global_step}
    final = out / "adapter"
    if is_main:
        trainer.save_model(str(final))
        tokenizer.save_pretrained(str(final))
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    return {
        "step": trainer.state.global_step, "max_steps": trainer.state.max_steps, "seconds": seconds,
        "micro_batch_rows": rows,
        "train_loss": float(result.training_loss), "final_loss": float(losses[-1]) if losses else float("nan"),
        "eval_loss": float(evals[-1]) if evals else None, "num_tokens": float(tokens),
        "trainable_parameters": int(trainable), "total_parameters": int(total), "device": device,
        "dtype": str(dtype).removeprefix("torch."), "assistant_markers": data.assistant_markers,
        "num_examples": data.num_examples, "log_history": history,
    }
