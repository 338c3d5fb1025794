"""Training throughput and memory: the job's training loop (packing + padding-free batches, micro-batches sized in
examples) against the two bare TRL SFTTrainer + PEFT scripts a user would write, same tiny model, same data, same
hyperparameters, each run in a fresh process of its own.

    .venvs/train/bin/python -m bench.train_throughput [--examples 1000] [--epochs 1] [--repeats 3]
        [--sides job,trl,trl-packed[,trl-grouped,job-compile,job-bf16]] [--job-micro-batch-size N]

Sides:
- job:         services.training.sft.fit with a TrainingJobSpec (packing=True: the job pre-tokenizes with the chat
               template, assistant-only loss masks, TRL's BFD packing, padding-free batches with position_ids, a
               micro-batch of packed rows that holds about micro_batch_size examples), called in-process with a
               stand-in job context whose artifacts are a real ArtifactStore over a local store in a temp dir
               (checkpoints go there, as in a job).
- trl:         the obvious script: SFTTrainer(model=..., args=SFTConfig(...), train_dataset=Dataset.from_list(
               [{"messages": ...}]), peft_config=LoraConfig(...)) with assistant_only_loss=True and TRL's default
               padded batches.
- trl-packed:  the same script with packing=True (TRL's BFD packing, padding-free): micro_batch_size packed rows
               of max_length tokens per step.
- trl-grouped: (optional) the padded script with train_sampling_strategy="group_by_length" (transformers 5's name
               for group_by_length: batches of similar lengths, less padding).
- job-compile, job-bf16: (optional) levers on the job: torch.compile (its warm-up inside the timed train()), and
               bf16 base weights with fp32 LoRA parameters under CPU autocast.
All sides see the same examples for the same number of epochs (equal work in examples, not in optimizer steps: a
packed step holds more examples), with the same learning rate and schedule, LoRA settings, seed, max_length and
checkpoint interval. tokens/s counts real (non-padding) tokens of the training set per second of
`trainer.train()` wall time (model loading, tokenization and packing are outside it and reported as setup);
tokens per CPU-second beside it (process CPU time of the same call) stays steady on a shared box, where wall time
does not. torch runs on 1 thread by default (--threads), on every side. Each run is a fresh spawned process
(nothing cached from the side before it), so its peak RSS is its own: the peak resident memory during train()
(Linux VmHWM, reset as train() starts) and the resident memory just before it. The runs rotate their order per
repeat; the table shows each side's medians, and each ratio is the median of the per-repeat pairs.

A packed micro-batch is micro_batch_size sequences of up to max_length tokens, i.e. several examples each, so at
the same micro_batch_size the job takes fewer, larger optimizer steps per epoch; and without a varlen attention
kernel (CPU, sdpa/eager) a padding-free batch is one row of micro_batch_size x max_length tokens whose
block-diagonal attention mask still costs the full quadratic attention. --job-micro-batch-size sets the job's
micro-batch alone to see both effects.

Losses: the train loss is the mean logged loss over the last 10% of each side's steps; the held-out eval loss is
computed after training, the same way for every side: the same held-out conversations, unpacked, right-padded
with an attention mask, token-weighted cross-entropy over the assistant tokens (the chat template's
{% generation %} mask).

Writes build/bench/train_throughput.json and train_throughput.png (loss curves against epochs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "build" / "fixtures" / "tiny-llama"
OUT = REPO / "build" / "bench" / "train_throughput.json"
MIB = 1024 * 1024
SIDES = ("job", "trl", "trl-packed")
OPTIONAL_SIDES = ("trl-grouped", "job-compile", "job-bf16")
LABELS = {"job": "job (packed)", "trl": "TRL (padded)", "trl-packed": "TRL packing=True", "trl-grouped":
          "TRL group_by_length", "job-compile": "job + torch.compile", "job-bf16": "job + bf16 (CPU autocast)"}


@dataclass
class BenchConfig:
    examples: int = 1000
    holdout: int = 200
    epochs: float = 1.0
    repeats: int = 3
    micro_batch_size: int = 4
    job_micro_batch_size: int = 0  # 0: the same as micro_batch_size (a packed micro-batch holds several examples)
    max_seq_len: int = 512
    learning_rate: float = 1e-3  # the fixture is randomly initialised: at the spec's 2e-4 its loss barely moves
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    warmup_ratio: float = 0.03
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 1
    model: str = str(MODEL)
    sides: tuple[str, ...] = SIDES


# ---------------------------------------------------------------------------------------------- data
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Cairo", "Lima", "Seoul"]
COUNTRIES = ["France", "England", "Japan", "Germany", "Spain", "Italy", "Norway", "Egypt", "Peru", "Korea"]
THINGS = ["apple", "book", "river", "mountain", "computer", "garden", "window", "teacher", "train", "song"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
VERBS = ["reads", "writes", "likes", "finds", "builds", "paints", "opens", "cleans", "visits", "watches"]
PAST = ["read", "wrote", "liked", "found", "built", "painted", "opened", "cleaned", "visited", "watched"]
TIMES = ["morning", "evening", "day", "week", "night", "weekend"]
MAX_SENTENCES = 22


def _sentence(rng: random.Random) -> str:
    n, c, t, col = rng.choice(NAMES), rng.choice(CITIES), rng.choice(THINGS), rng.choice(COLORS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{n} {rng.choice(VERBS)} the {col} {t} in {c} every {rng.choice(TIMES)}."
    if kind == 1:
        return f"The {t} near the {col} {rng.choice(THINGS)} belongs to {n}, who lives in {c}."
    if kind == 2:
        j = rng.randrange(len(CITIES))
        return f"The capital of {COUNTRIES[j]} is {CITIES[j]}, and {n} {rng.choice(VERBS)} a {t} there."
    if kind == 3:
        return f"After the {rng.choice(TIMES)}, {n} and {rng.choice(NAMES)} {rng.choice(PAST)} the {col} {t}."
    return f"In {c}, the {col} {t} is old, but {n} still {rng.choice(VERBS)} it."


def _answer(rng: random.Random, q_kind: int, subject: tuple[str, str, int]) -> str:
    """A reply of 1 to MAX_SENTENCES sentences, the count log-uniform: mostly short answers, a long tail."""
    name, thing, j = subject
    k = min(MAX_SENTENCES, int(math.exp(rng.uniform(0.0, math.log(MAX_SENTENCES + 1)))))
    first = (f"The capital of {COUNTRIES[j]} is {CITIES[j]}." if q_kind == 0 else
             f"{name} keeps the {thing} in {CITIES[j]}.")
    return " ".join([first] + [_sentence(rng) for _ in range(k - 1)])


def _question(rng: random.Random) -> tuple[str, int, tuple[str, str, int]]:
    name, thing, j = rng.choice(NAMES), rng.choice(THINGS), rng.randrange(len(CITIES))
    q_kind = rng.randrange(3)
    q = (f"What is the capital of {COUNTRIES[j]}?" if q_kind == 0 else
         f"Where does {name} keep the {thing}?" if q_kind == 1 else
         f"Tell me about {name} and the {rng.choice(COLORS)} {thing}, please.")
    return q, min(q_kind, 1), (name, thing, j)


def make_examples(n: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic chats of varied length: one exchange (80%) or two (20%), each answer 1..22 sentences."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        for _turn in range(2 if rng.random() < 0.2 else 1):
            q, q_kind, subject = _question(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": _answer(rng, q_kind, subject)}]
        out.append({"messages": messages})
    return out


# ChatML with the assistant turns marked for assistant-only loss (SmolLM2's own template has no markers)
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def with_generation_markers(model: Path, work: Path) -> Path:
    """The model itself if its chat template marks the assistant turns ({% generation %}); for a ChatML template
    without them (SmolLM2), a folder of links to its files with the marked ChatML template beside them."""
    template = model / "chat_template.jinja"
    text = template.read_text() if template.is_file() else ""
    if "{% generation %}" in text or "<|im_start|>" not in text:
        return model
    out = work / f"{model.name}-marked"
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "chat_template.jinja":
            (out / f.name).symlink_to(f.resolve())
    (out / "chat_template.jinja").write_text(CHATML_MARKED)
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def length_stats(lengths: list[int]) -> dict[str, float]:
    s = sorted(lengths)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(p / 100 * len(s)))]

    return {"min": s[0], "p10": pct(10), "p25": pct(25), "p50": pct(50), "p75": pct(75), "p90": pct(90),
            "max": s[-1], "mean": sum(s) / len(s)}


def padded_tokens(lengths: list[int], batch: int) -> int:
    """Tokens a padded batcher processes for these lengths in this order (each batch padded to its longest)."""
    return sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))


# ---------------------------------------------------------------------------------------------- the two sides
class BenchContext:
    """The part of services.core.jobctx.JobContext that fit() and its JobCallback use; events are kept in memory,
    artifacts (checkpoints) go to a real ArtifactStore over a LocalObjectStore."""

    def __init__(self, store_root: Path, job_id: str = "bench-train"):
        from services.core.artifacts import ArtifactStore
        from services.core.store import LocalObjectStore

        self.job_id = job_id
        self.artifacts = ArtifactStore(LocalObjectStore(store_root), "bench")
        self.events: list[dict[str, Any]] = []

    def event(self, text: str, **kw: Any) -> None:
        self.events.append({"text": text, **{k: v for k, v in kw.items() if k != "artifact"}})

    def metrics(self, step: int, metrics: dict[str, float], *, total_steps: int = 0, text: str = "") -> None:
        self.events.append({"type": "metrics", "step": step, "total_steps": total_steps, "metrics": metrics})

    def cancel_requested(self, every_s: float = 1.0) -> str | None:
        return None


def job_spec(cfg: BenchConfig, base_model, dataset, precision: str = "fp32"):
    from services.training.spec import LoraSpec, OptimizerSpec, TrainingJobSpec

    return TrainingJobSpec(
        base_model=base_model, dataset=dataset, name="bench-train", method="lora",
        lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout),
        optimizer=OptimizerSpec(learning_rate=cfg.learning_rate, lr_scheduler="cosine", warmup_ratio=cfg.warmup_ratio),
        epochs=cfg.epochs, micro_batch_size=cfg.job_micro_batch_size or cfg.micro_batch_size,
        max_seq_len=cfg.max_seq_len, packing=True,
        seed=cfg.seed, eval_samples=0,  # the held-out loss is computed after training, the same way for both sides
        checkpoint_every_steps=cfg.checkpoint_every, precision=precision, device="cpu")


def register(ctx: BenchContext, kind: str, name: str, folder: Path):
    """Put a folder in the store as an artifact (checkpoints name the base model and the dataset as parents)."""
    writer = ctx.artifacts.writer(kind, name, parents=[], job_id=ctx.job_id)
    for _ in writer.add_dir(folder):
        pass
    return writer.commit({})[0].ref()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux: VmHWM, `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


@contextlib.contextmanager
def train_timer():
    """Times every SFTTrainer.train() inside the block, wall and process CPU seconds, and its peak resident memory
    (the high-water mark reset as it starts): one stopwatch for every side (the job's fit() builds its trainer)."""
    from trl import SFTTrainer

    orig = SFTTrainer.train
    box: dict[str, float] = {}

    def timed(self, *args, **kwargs):
        box["rss_before_train_bytes"] = rss_bytes()
        box["peak_rss_reset"] = reset_peak_rss()
        w, c = time.perf_counter(), time.process_time()
        try:
            return orig(self, *args, **kwargs)
        finally:
            box["train_s"], box["train_cpu_s"] = time.perf_counter() - w, time.process_time() - c
            box["peak_rss_bytes"] = peak_rss_bytes()

    SFTTrainer.train = timed
    try:
        yield box
    finally:
        SFTTrainer.train = orig


@contextlib.contextmanager
def compiled_trainer():
    """The job's SFTConfig with torch_compile=True (a lever measured here, not a spec field)."""
    from services.training import sft

    orig = sft.sft_kwargs

    def with_compile(*args, **kwargs):
        return {**orig(*args, **kwargs), "torch_compile": True}

    sft.sft_kwargs = with_compile
    try:
        yield
    finally:
        sft.sft_kwargs = orig


def run_job(cfg: BenchConfig, data_dir: Path, work: Path, variant: str = "job") -> dict[str, Any]:
    import peft  # noqa: F401 - imported before the clock starts, as run_trl does
    import trl  # noqa: F401

    from services.training.sft import fit

    ctx = BenchContext(work / "store")
    spec = job_spec(cfg, register(ctx, "model", "tiny-llama", Path(cfg.model)),
                    register(ctx, "dataset", "synthetic", data_dir),
                    precision="bf16" if variant == "job-bf16" else "fp32")
    out = work / "run"
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with train_timer() as timer, (compiled_trainer() if variant == "job-compile" else contextlib.nullcontext()):
        result = fit(ctx, spec, Path(cfg.model), data_dir, out, None)
    wall = time.perf_counter() - t0
    assert "cancelled" not in result, result
    return {**timer, "wall_s": wall, "job_reported_s": result["seconds"], "steps": result["step"],
            "rows_per_step": result["micro_batch_rows"], "log_history": result["log_history"],
            "adapter": str(out / "adapter"),
            "checkpoints": sum(1 for e in ctx.events if e.get("type") == "artifact")}


def run_trl(cfg: BenchConfig, train_rows: list[dict[str, Any]], work: Path, variant: str = "trl") -> dict[str, Any]:
    """What a user writes with TRL + PEFT, given the same hyperparameters (TRL's SFTConfig defaults bf16 and
    gradient checkpointing on: both off here, and the base in float32, as in the job's spec). trl-packed adds
    packing=True (BFD, padding-free), trl-grouped train_sampling_strategy="group_by_length"."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    import torch

    t0 = time.perf_counter()
    # float32 as the job's spec says (transformers 5 would otherwise load the checkpoint's own dtype: SmolLM2's
    # bf16, whose matmuls this AVX2 CPU runs on a slow fallback path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    extra: dict[str, Any] = {"packing": True} if variant == "trl-packed" else (
        {"train_sampling_strategy": "group_by_length"} if variant == "trl-grouped" else {})
    args = SFTConfig(
        output_dir=str(work / "run"), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.micro_batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,
        max_length=cfg.max_seq_len, assistant_only_loss=True, seed=cfg.seed,
        bf16=False, gradient_checkpointing=False, save_steps=cfg.checkpoint_every,
        logging_steps=1, report_to="none", disable_tqdm=True, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)  # as the job does: no printed log dicts
    with train_timer() as timer:
        trainer.train()
    trainer.save_model(str(work / "adapter"))
    return {**timer, "wall_s": time.perf_counter() - t0, "steps": trainer.state.global_step,
            "rows_per_step": cfg.micro_batch_size, "log_history": trainer.state.log_history,
            "adapter": str(work / "adapter"),
            "checkpoints": len(list((work / "run").glob("checkpoint-*")))}


def planned_train_bytes(cfg: BenchConfig, rows_per_step: int) -> dict[str, float]:
    """What the training service's planner (services/training/planner.py) says one step of this run adds above the
    loaded model: adapter gradients, AdamW states and the activations of one micro-batch (fp32 on CPU, TRL's fused
    LM head), for `rows_per_step` rows of max_seq_len tokens; the full-logits figure beside it."""
    from services.training.planner import GIB, ModelShape, all_linear_targets, estimate

    config = json.loads((Path(cfg.model) / "config.json").read_text())
    kw = {"method": "lora", "rank": cfg.lora_rank, "target_modules": all_linear_targets(ModelShape.from_config(config)),
          "micro_batch_size": rows_per_step,
          "max_seq_len": cfg.max_seq_len, "gradient_checkpointing": False, "precision": "fp32",
          "adapter_precision": "fp32", "dropout": cfg.lora_dropout}
    out = {}
    for head in ("fused", "full"):
        est = estimate(config, lm_head=head, **kw)
        out[head] = (est.gradients_gib + est.optimizer_gib + est.activations_gib) * GIB
    return out


def run_side(side: str, cfg: BenchConfig, data_dir: Path, train_rows: list[dict[str, Any]], work: Path) -> dict:
    """One run of one side, in the calling process (the benchmark calls it in a fresh spawned process)."""
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    r = run_job(cfg, data_dir, work, side) if side.startswith("job") else run_trl(cfg, train_rows, work, side)
    r["peak_rss_process_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r["torch_threads"] = torch.get_num_threads()
    return r


def run_side_in_child(side: str, cfg: BenchConfig, data_dir: Path, train_rows: list[dict[str, Any]],
                      work: Path) -> dict:
    """run_side in a fresh spawned process: no side inherits another's imports, caches or allocator state, and
    its peak memory is its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_side, side, cfg, data_dir, train_rows, work).result()


# ---------------------------------------------------------------------------------------------- held-out loss
def heldout_loss(model_dir: str, adapter: Path | None, rows: list[dict[str, list[int]]], batch: int = 16) -> float:
    """Token-weighted cross-entropy over the assistant tokens of `rows` (input_ids + assistant_masks), unpacked."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    pad = int(model.config.pad_token_id or 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for b, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[b, :n] = torch.tensor(r["input_ids"])
                attn[b, :n] = 1
                labels[b, :n] = torch.where(torch.tensor(r["assistant_masks"]) == 1, ids[b, :n], -100)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1)


def packing_isolation(model_dir: str, lengths: tuple[int, ...] = (37, 120, 64)) -> dict[str, float]:
    """Do packed sequences (one row, position_ids restarting at 0, no attention mask: TRL's padding-free batch) see
    each other? The largest |logit| difference against each sequence run alone: as SFTTrainer calls the model
    (use_cache=False), and with the model's default cache on (then transformers' masking_utils skips the
    packed-sequence detection and the row is one causal sequence)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, model.config.vocab_size - 4, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        cached = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0]
    return {"attn_implementation": model.config._attn_implementation,
            "max_abs_logit_diff": float((packed - alone).abs().max()),
            "max_abs_logit_diff_use_cache": float((cached - alone).abs().max())}


# ---------------------------------------------------------------------------------------------- the benchmark
def curve(history: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(float(h["epoch"]), float(h["loss"])) for h in history if "loss" in h and "epoch" in h]


def tail_loss(history: list[dict[str, Any]], fraction: float = 0.1) -> float:
    losses = [loss for _, loss in curve(history)]
    k = max(1, round(len(losses) * fraction))
    return sum(losses[-k:]) / k if losses else float("nan")


def pct_diff(a: float, b: float) -> float:
    return 100.0 * (a - b) / b if b else float("nan")


def run_benchmark(cfg: BenchConfig, out_json: Path | None = OUT, verbose: bool = True) -> dict[str, Any]:
    """Both sides, cfg.repeats times each; prints the table (verbose), saves the JSON and PNG (out_json)."""
    import torch

    def say(text: str) -> None:
        if verbose:
            print(text, flush=True)

    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _benchmark(cfg, out_json, say)
    finally:
        torch.set_num_threads(threads)


def _benchmark(cfg: BenchConfig, out_json: Path | None, say) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from services.training.sft import GENERATION_MARKER, library_versions, tokenize_example

    if not (Path(cfg.model) / "config.json").is_file():
        raise SystemExit(f"{cfg.model} is missing: run `make fixtures` first")
    root = Path(tempfile.mkdtemp(prefix="tunery-bench-train-"))
    source = cfg.model
    cfg = replace(cfg, model=str(with_generation_markers(Path(cfg.model), root)))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    assert GENERATION_MARKER in (tokenizer.chat_template or ""), "the fixture's template has no {% generation %}"
    train_rows = make_examples(cfg.examples, cfg.seed)
    held_rows = make_examples(cfg.holdout, cfg.seed + 10_000)
    train_tok = [tokenize_example(tokenizer, r, True) for r in train_rows]
    held_tok = [{k: v[:cfg.max_seq_len] for k, v in tokenize_example(tokenizer, r, True).items()} for r in held_rows]
    lengths = [min(len(r["input_ids"]), cfg.max_seq_len) for r in train_tok]
    tokens = int(sum(lengths) * cfg.epochs)
    pad_frac = 1.0 - sum(lengths) / padded_tokens(lengths, cfg.micro_batch_size)
    stats = length_stats(lengths)
    say(f"data: {cfg.examples} train / {cfg.holdout} held-out synthetic chats; tokens per example (chat template "
        f"applied) min {stats['min']}, p10 {stats['p10']}, median {stats['p50']}, mean {stats['mean']:.0f}, "
        f"p90 {stats['p90']}, max {stats['max']}; {sum(lengths):,} train tokens; padded batches of "
        f"{cfg.micro_batch_size} in file order would be {100 * pad_frac:.0f}% padding")
    say(f"model: {cfg.model} ({torch.get_num_threads()} torch threads); lr {cfg.learning_rate}, cosine, warmup "
        f"{cfg.warmup_ratio}, micro-batch {cfg.micro_batch_size}"
        + (f" (job: {cfg.job_micro_batch_size} packed)" if cfg.job_micro_batch_size else "") + f", max_length {cfg.max_seq_len}, LoRA r{cfg.lora_rank} "
        f"a{cfg.lora_alpha:g} all-linear, {cfg.epochs:g} epoch(s), seed {cfg.seed}, {cfg.repeats} repeat(s)")

    runs: list[dict[str, Any]] = []
    try:
        data_dir = root / "data"
        data_dir.mkdir()
        write_jsonl(data_dir / "train.jsonl", train_rows)
        base_eval = heldout_loss(cfg.model, None, held_tok)
        say(f"held-out loss of the untrained base: {base_eval:.4f}")
        isolation = packing_isolation(cfg.model)
        say(f"packed sequences isolated ({isolation['attn_implementation']}): max |logit diff| against running each "
            f"alone {isolation['max_abs_logit_diff']:.2g} (use_cache=False, as SFTTrainer); "
            f"{isolation['max_abs_logit_diff_use_cache']:.2g} with the cache on")
        for rep in range(cfg.repeats):
            order = list(cfg.sides[rep % len(cfg.sides):]) + list(cfg.sides[:rep % len(cfg.sides)])
            for side in order:
                work = root / f"{side}-{rep}"
                work.mkdir()
                r = run_side_in_child(side, cfg, data_dir, train_rows, work)
                r["eval_loss"] = heldout_loss(cfg.model, Path(r.pop("adapter")), held_tok)
                history = r.pop("log_history")
                trl_tokens = max((float(h.get("num_tokens", 0)) for h in history), default=0.0)
                row = {"side": side, "repeat": rep, "tokens": tokens, "tokens_per_s": tokens / r["train_s"],
                       "tokens_per_cpu_s": tokens / r["train_cpu_s"],
                       "examples_per_s": cfg.examples * cfg.epochs / r["train_s"], "setup_s": r["wall_s"] - r["train_s"],
                       "train_loss": tail_loss(history), "first_loss": curve(history)[0][1] if curve(history) else None,
                       "trl_num_tokens": trl_tokens, "curve": curve(history),
                       "planned_train_bytes": planned_train_bytes(cfg, r["rows_per_step"]), **r}
                row["measured_train_bytes"] = r["peak_rss_bytes"] - r["rss_before_train_bytes"]
                runs.append(row)
                say(f"  repeat {rep} {side:11}: {row['steps']:4d} steps, train {r['train_s']:6.1f} s wall "
                    f"({row['tokens_per_s']:7,.0f} tokens/s), {r['train_cpu_s']:6.1f} s CPU "
                    f"({row['tokens_per_cpu_s']:7,.0f} tokens/CPU-s), peak RSS {r['peak_rss_bytes'] / MIB:6.0f} MiB, "
                    f"setup+save {row['setup_s']:4.1f} s, train loss {row['train_loss']:.4f}, "
                    f"eval loss {r['eval_loss']:.4f}")
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(side: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in runs if r["side"] == side)

    summary: dict[str, Any] = {
        side: {k: med(side, k) for k in ("tokens_per_s", "tokens_per_cpu_s", "examples_per_s", "train_s",
                                         "train_cpu_s", "setup_s", "wall_s", "steps", "train_loss", "eval_loss",
                                         "trl_num_tokens", "checkpoints", "peak_rss_bytes", "rss_before_train_bytes",
                                         "measured_train_bytes")}
        for side in cfg.sides}
    summary["base_eval_loss"] = base_eval
    # the job against each other side: the ratio of each repeat's pair (run back to back, so under about the same
    # load), then the median over repeats
    summary["versus"] = {}
    for other in (x for x in cfg.sides if x != "job"):
        pairs = list(zip([r for r in runs if r["side"] == "job"], [r for r in runs if r["side"] == other]))
        if not pairs:
            continue
        per = [j["tokens_per_s"] / o["tokens_per_s"] for j, o in pairs]
        cpu = [j["tokens_per_cpu_s"] / o["tokens_per_cpu_s"] for j, o in pairs]
        summary["versus"][other] = {
            "ratio": statistics.median(per), "ratio_per_repeat": per, "cpu_ratio": statistics.median(cpu),
            "cpu_ratio_per_repeat": cpu,
            "eval_loss_diff_pct": pct_diff(summary["job"]["eval_loss"], summary[other]["eval_loss"]),
            "train_loss_diff_pct": pct_diff(summary["job"]["train_loss"], summary[other]["train_loss"]),
            "peak_rss_ratio": summary["job"]["peak_rss_bytes"] / summary[other]["peak_rss_bytes"]}
    result = {"config": asdict(cfg), "model_source": source, "libraries": library_versions(),
              "torch_threads": cfg.threads or torch.get_num_threads(),
              "cpus": os.cpu_count(),
              "data": {"train_examples": cfg.examples, "holdout_examples": cfg.holdout, "train_tokens": sum(lengths),
                       "tokens_per_example": stats, "padding_fraction_file_order": pad_frac},
              "packing_isolation": isolation, "runs": runs, "summary": summary}
    say(table(result))
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1))
        png = out_json.with_suffix(".png")
        try:
            plot(result, png)
            say(f"wrote {out_json} and {png}")
        except Exception as exc:  # noqa: BLE001 - the plot is a nicety
            say(f"wrote {out_json} (no plot: {exc})")
    return result


def table(result: dict[str, Any]) -> str:
    s, n, sides = result["summary"], result["config"]["repeats"], result["config"]["sides"]
    spec = [("tokens/s (real tokens, wall)", "tokens_per_s", "{:,.0f}"), ("tokens per CPU-second", "tokens_per_cpu_s",
             "{:,.0f}"), ("examples/s", "examples_per_s", "{:,.1f}"), ("train time (s wall)", "train_s", "{:.1f}"),
            ("train time (s CPU)", "train_cpu_s", "{:.1f}"), ("setup + save (s)", "setup_s", "{:.1f}"),
            ("optimizer steps", "steps", "{:.0f}"), ("checkpoints written", "checkpoints", "{:.0f}"),
            ("peak RSS during train() (MiB)", "peak_rss_bytes", "MiB"),
            ("RSS as train() starts (MiB)", "rss_before_train_bytes", "MiB"),
            ("peak - start: what training added (MiB)", "measured_train_bytes", "MiB"),
            ("train loss (last 10% of steps)", "train_loss", "{:.4f}"), ("held-out eval loss", "eval_loss", "{:.4f}"),
            ("tokens counted by TRL", "trl_num_tokens", "{:,.0f}")]

    def cell(side: str, key: str, fmt: str) -> str:
        v = s[side][key]
        return f"{v / MIB:,.0f}" if fmt == "MiB" else fmt.format(v)

    rows = [("", *[LABELS[x] for x in sides])] + [(label, *[cell(x, key, fmt) for x in sides])
                                                   for label, key, fmt in spec]
    w = max(len(r[0]) for r in rows)
    cw = max(max(len(c) for c in r[1:]) for r in rows) + 2
    head = (f"medians over {n} repeat(s); {result['data']['train_examples']} examples x "
            f"{result['config']['epochs']:g} epoch(s), {result['data']['train_tokens']:,} real tokens per epoch")
    lines = [head] + ["".join([f"{r[0]:<{w}}"] + [f"{c:>{cw}}" for c in r[1:]]) for r in rows]
    for other, v in s["versus"].items():
        lines.append(f"job / {LABELS[other]}: tokens/s {v['ratio']:.2f}x wall (per repeat "
                     + ", ".join(f"{x:.2f}" for x in v["ratio_per_repeat"]) + f"), {v['cpu_ratio']:.2f}x CPU; "
                     f"held-out loss {v['eval_loss_diff_pct']:+.2f}%; peak RSS {v['peak_rss_ratio']:.2f}x")
    for side in sides:
        run = next(r for r in result["runs"] if r["side"] == side)
        plan = run["planned_train_bytes"]
        lines.append(f"planner, {LABELS[side]} ({run['rows_per_step']} row(s) of {result['config']['max_seq_len']} "
                     f"tokens per step): {plan['fused'] / MIB:,.0f} MiB above the loaded model with TRL's fused LM "
                     f"head ({plan['full'] / MIB:,.0f} MiB if the logits were materialized); measured "
                     f"{run['measured_train_bytes'] / MIB:,.0f} MiB")
    lines.append(f"untrained base eval loss {s['base_eval_loss']:.4f}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    colors = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red", "tab:brown"]
    for side, color in zip(result["config"]["sides"], colors):
        run = next(r for r in result["runs"] if r["side"] == side)
        if run["curve"]:
            ax.plot(*zip(*run["curve"]), color=color, lw=1.0, alpha=0.8,
                    label=f"{LABELS[side]}: train loss, {run['steps']} steps")
        ax.plot([result["config"]["epochs"]], [run["eval_loss"]], "o", color=color, markeredgecolor="black",
                label=f"{LABELS[side]}: held-out loss {run['eval_loss']:.3f}")
    ax.set_xlabel("epoch (examples seen)")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("bench.train_throughput: tiny-llama, LoRA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    d = BenchConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=d.examples, help="training examples")
    ap.add_argument("--holdout", type=int, default=d.holdout, help="held-out examples for the eval loss")
    ap.add_argument("--epochs", type=float, default=d.epochs)
    ap.add_argument("--repeats", type=int, default=d.repeats, help="runs of each side (alternating order)")
    ap.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    ap.add_argument("--job-micro-batch-size", type=int, default=d.job_micro_batch_size,
                    help="the job's micro-batch (packed sequences of up to max-seq-len tokens); 0: the same as "
                         "--micro-batch-size")
    ap.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    ap.add_argument("--lr", type=float, default=d.learning_rate)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads,
                    help="torch CPU threads, both sides (0: torch's default; 1 keeps a shared box's numbers steady)")
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--sides", default=",".join(d.sides),
                    help=f"comma-separated, 'job' first; default {','.join(SIDES)}; "
                         f"optional {','.join(OPTIONAL_SIDES)}")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON result (a PNG of the loss curves goes beside it)")
    a = ap.parse_args()
    sides = tuple(x.strip() for x in a.sides.split(",") if x.strip())
    unknown = [x for x in sides if x not in SIDES + OPTIONAL_SIDES]
    if unknown or not sides or sides[0] != "job":
        ap.error(f"--sides: {unknown or sides} (each one of {', '.join(SIDES + OPTIONAL_SIDES)}, 'job' first)")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = BenchConfig(examples=a.examples, holdout=a.holdout, epochs=a.epochs, repeats=a.repeats,
                      micro_batch_size=a.micro_batch_size, job_micro_batch_size=a.job_micro_batch_size,
                      max_seq_len=a.max_seq_len, learning_rate=a.lr,
                      seed=a.seed, threads=a.threads, model=a.model, sides=sides)
    run_benchmark(cfg, a.out)


if __name__ == "__main__":
    main()
