"""The quantize job: `python -m services.quantization.job <spec-uri>` (quantize environment).

quantization.quantize: setup (materialise the model; a seeded sample of the calibration dataset's train split,
rendered with the model's own chat template and hashed into the lineage) -> run (the model loaded with its weights
offloaded to local disk beyond a resident budget; llmcompressor's oneshot through the sequential pipeline, one
decoder layer onloaded and calibrated at a time; then the saved checkpoint reloaded and its greedy answers compared
with the full-precision model's) -> save (a `model` artifact, form quantized: the compressed-tensors checkpoint, its
tokenizer and chat template, the recipe, a model card; parents the model and the calibration dataset).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.core.jobctx import JobContext, run_job
from services.core.memory import PeakRss
from services.quantization.schemes import SCHEMES, recipe_args
from services.quantization.spec import QuantizeSpec

PROBES = 4            # calibration conversations whose greedy answers compare the forms
PROBE_TOKENS = 16
MAX_SHARD = "512MB"   # the output is written shard by shard (an offloaded model is onloaded one shard at a time)


@dataclass
class Calibration:
    texts: list[str]
    probes: list[list[dict]]
    sha256: str
    dataset_uri: str


def sample_conversations(train_jsonl: Path, n: int, seed: int) -> list[list[dict]]:
    """A seeded sample of n conversations of the train split (all of them when it has fewer)."""
    rows = []
    for line in train_jsonl.read_text().splitlines():
        if line.strip():
            messages = json.loads(line).get("messages") or []
            if messages:
                rows.append([{"role": m["role"], "content": m.get("content") or ""} for m in messages])
    rng = random.Random(seed)
    return rng.sample(rows, n) if len(rows) > n else rows


def calibration_set(ctx: JobContext, spec: QuantizeSpec, tokenizer) -> Calibration | None:
    if spec.calibration_dataset is None:
        return None
    data = ctx.artifacts.resolve(spec.calibration_dataset)
    folder = ctx.artifacts.materialize(data.ref(), ctx.settings.cache_dir, paths=["train.jsonl"])
    conversations = sample_conversations(folder / "train.jsonl", spec.num_calibration_samples, spec.seed)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    probes = []
    for c in conversations[:PROBES]:
        last = max((i for i, m in enumerate(c) if m["role"] == "assistant"), default=0)
        probes.append(c[:last] or c)
    return Calibration(texts, probes, digest, data.uri)


def load(model_dir: Path, resident_bytes: int, offload_dir: Path, dtype: str = "auto"):
    """The model in `dtype` ("auto": its own) with its weights beyond `resident_bytes` offloaded to local disk
    (compressed-tensors' offloading: onloaded module by module when used)."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto",
                                                    max_memory={"cpu": max(resident_bytes, 1 << 20)},
                                                    offload_folder=str(offload_dir))


def stored_dtype(model_dir: Path) -> str:
    """The dtype a checkpoint's config says its weights are in ("" when it does not say)."""
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "")


def store_floats_as(folder: Path, dtype: str) -> int:
    """Rewrite a saved checkpoint's float32 tensors (the unquantized weights, the quantization scales) in `dtype`,
    one shard at a time, and say so in its config.json: a model computed in float32 is stored in its own 16-bit dtype
    again (vLLM's W4A16 kernels take 16-bit activations). Integer tensors (packed weights, zero points) are kept.
    Returns the number of tensors cast."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    cast = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k, t in tensors.items():
            if t.dtype == torch.float32:
                tensors[k], cast = t.to(target), cast + 1
        tmp = shard.with_suffix(".tmp")
        save_file(tensors, tmp, metadata=metadata)
        tmp.replace(shard)
        del tensors
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return cast


def greedy(model, tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    import torch

    out = []
    for c in conversations:
        ids = tokenizer.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=PROBE_TOKENS, do_sample=False)
        out.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """The share of greedy tokens that agree up to the first difference, over every probe; and how many probes
    agree entirely."""
    agree = total = whole = 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        agree, total = agree + n, total + max(len(x), len(y), 1)
        whole += int(x == y)
    return (agree / total if total else 0.0), whole


def skip_pinning(cuda_available: bool) -> bool:
    """Whether llmcompressor's activation cache must not pin memory: pinning only speeds host-to-GPU copies, and
    with no accelerator torch refuses it ("Cannot access accelerator device when none is available": AWQ's
    smoothing pins its cached activations unconditionally in llmcompressor 0.14)."""
    return not cuda_available


def without_pinning() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def build_recipe(spec: QuantizeSpec):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    kinds = {"GPTQModifier": GPTQModifier, "AWQModifier": AWQModifier, "QuantizationModifier": QuantizationModifier,
             "SmoothQuantModifier": SmoothQuantModifier}
    args = recipe_args(SCHEMES[spec.scheme], spec.resolved_ignore, spec.group_size)
    return [kinds[name](**kw) for name, kw in args["modifiers"]]


class LayerProgress:
    """An event as each decoder layer is calibrated (i of n, with the RSS), and a cancel check between layers:
    llmcompressor's sequential pipeline announces each calibrated subgraph (one per layer, and the head) through
    LifecycleCallbacks.sequential_epoch_end, wrapped here while the block runs."""

    def __init__(self, ctx: JobContext, model):
        self.ctx, self.done = ctx, 0
        layers = getattr(getattr(model, "model", model), "layers", None) or []
        self.n = len(layers)

    def __enter__(self) -> "LayerProgress":
        from llmcompressor.core import LifecycleCallbacks

        self.cls, self.original = LifecycleCallbacks, LifecycleCallbacks.__dict__["sequential_epoch_end"]
        original = self.original.__func__

        def wrapped(cls, modules, **kwargs):
            result = original(cls, modules, **kwargs)
            self.step()
            return result

        LifecycleCallbacks.sequential_epoch_end = classmethod(wrapped)
        return self

    def __exit__(self, *exc) -> None:
        self.cls.sequential_epoch_end = self.original

    def step(self) -> None:
        self.done += 1
        rss = PeakRss.now()
        of = max(self.n, self.done)
        what = f"layer {self.done} of {self.n}" if self.done <= self.n else "the head (after the last layer)"
        self.ctx.metrics(self.done, {"layer": float(self.done), "rss_bytes": float(rss)}, total_steps=of + 1,
                         text=f"calibrated {what}; RSS {rss / 2**20:.0f} MiB")
        self.ctx.check_cancelled()


def model_card(spec: QuantizeSpec, model_uri: str, cal: Calibration | None, figures: dict) -> str:
    s = SCHEMES[spec.scheme]
    lines = [f"# {spec.name}", "", f"`{model_uri}` quantized by Tunery: {s.description}.", "",
             "| | |", "|---|---|", f"| scheme | {s.name} ({s.family}) |", f"| loads in | {s.engine} |",
             f"| group size | {spec.group_size or 'per channel'} |",
             f"| kept at full precision | {', '.join(f'`{i}`' for i in spec.resolved_ignore)} |",
             "| calibration | " + (f"{len(cal.texts)} conversations of `{cal.dataset_uri}` ({spec.calibration_source}), "
                                   f"sha256 {cal.sha256[:16]}…" if cal else "none (data-free)") + " |",
             f"| size | {figures['output_bytes'] / 2**20:.1f} MiB, {figures['compression_ratio']:.2f}x smaller |",
             f"| greedy token agreement with the full-precision model | {figures['greedy_agreement']:.1%} "
             f"({figures['greedy_identical']:.0f} of {figures['probes']:.0f} probes identical) |", ""]
    return "\n".join(lines)


def quantize_job(ctx: JobContext, spec: QuantizeSpec) -> None:
    if SCHEMES[spec.scheme].family == "gguf":  # llama.cpp's converter and quantizer
        from services.quantization.gguf import quantize_gguf

        return quantize_gguf(ctx, spec)
    import torch
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from services.core.hardware import compute_dtype
    from services.core.modeldir import inspect_model

    # setup
    if skip_pinning(torch.cuda.is_available()):
        without_pinning()
    model = ctx.artifacts.resolve(spec.model)
    model_dir = ctx.artifacts.materialize(model.ref(), ctx.settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cal = calibration_set(ctx, spec, tokenizer)
    scheme = SCHEMES[spec.scheme]
    # a CPU without native bf16 computes in float32 (services.core.hardware); the output is stored in the model's dtype
    dtype, own = compute_dtype("cuda" if torch.cuda.is_available() else "cpu"), stored_dtype(model_dir)
    recast = dtype == "float32" and own not in ("", "float32")
    work = Path(tempfile.mkdtemp(prefix="tunery-quantize-"))
    out = work / "quantized"
    try:
        ctx.event(f"quantizing {model.id} to {scheme.name}: keeping {', '.join(spec.resolved_ignore)} at full "
                  f"precision" + (f", group size {spec.group_size}" if spec.group_size else "")
                  + (f"; calibrating on {len(cal.texts)} conversations of {cal.dataset_uri} ({spec.calibration_source})"
                     if cal else "; data-free") + f"; {spec.resident_weight_bytes / 2**20:.0f} MiB of weights "
                  f"resident, the rest offloaded to disk (planned peak {spec.planned_peak_bytes / 2**20:.0f} MiB)"
                  + (f"; computing in float32 (this CPU has no native bf16), stored in {own}" if recast else ""))
        # run: the reference answers, then the oneshot calibration, layer by layer
        t0 = time.monotonic()
        with PeakRss() as rss:
            lm = load(model_dir, spec.resident_weight_bytes, work / "offload", dtype)
            probes = cal.probes if cal else [[{"role": "user", "content": "What is the capital of France?"}]]
            reference = greedy(lm, tokenizer, probes)
            kwargs = {}
            if cal:
                from datasets import Dataset

                data = Dataset.from_dict({"text": cal.texts}).map(
                    lambda r: tokenizer(r["text"], add_special_tokens=False, truncation=True,
                                        max_length=spec.calibration_max_seq_len), remove_columns=["text"])
                kwargs = {"dataset": data, "num_calibration_samples": len(cal.texts),
                          "max_seq_length": spec.calibration_max_seq_len, "pipeline": "sequential"}
            else:
                kwargs = {"pipeline": "datafree"}
            torch.manual_seed(spec.seed)
            with LayerProgress(ctx, lm) as progress:
                oneshot(model=lm, recipe=build_recipe(spec), **kwargs)
            ctx.check_cancelled()
            ctx.phase("writing the compressed checkpoint")
            lm.save_pretrained(out, save_compressed=True, max_shard_size=MAX_SHARD)
            tokenizer.save_pretrained(out)
            del lm
            if recast:
                store_floats_as(out, own)
        quantize_s = time.monotonic() - t0
        # run: the saved checkpoint loads and answers like the model it came from
        ctx.phase("reloading the quantized checkpoint and comparing its answers")
        with PeakRss() as check_rss:
            reloaded = load(out, spec.resident_weight_bytes, work / "offload-check", dtype)
            answers = greedy(reloaded, tokenizer, probes)
            del reloaded
        rate, identical = agreement(reference, answers)
        output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        input_bytes = sum(f.size for f in model.files if f.path.endswith(".safetensors"))
        figures = {"quantize_peak_rss_bytes": float(rss.peak), "check_peak_rss_bytes": float(check_rss.peak),
                   "planned_peak_bytes": float(spec.planned_peak_bytes), "model_bytes": float(input_bytes),
                   "output_bytes": float(output_bytes), "compression_ratio": input_bytes / max(output_bytes, 1),
                   "greedy_agreement": rate, "greedy_identical": float(identical), "probes": float(len(probes)),
                   "quantize_s": quantize_s, "layers": float(progress.n)}
        ctx.event(f"quantized in {quantize_s:.1f}s, peak RSS {rss.peak / 2**20:.0f} MiB (planned "
                  f"{spec.planned_peak_bytes / 2**20:.0f}, the model {input_bytes / 2**20:.0f} MiB); "
                  f"{output_bytes / 2**20:.1f} MiB written ({figures['compression_ratio']:.2f}x smaller); greedy "
                  f"tokens agree with the full-precision model at {rate:.1%} ({identical} of {len(probes)} probes "
                  "identical)", type="metrics", metrics=figures, step=progress.n + 1, total_steps=progress.n + 1)
        if not output_bytes:
            ctx.fail("the quantized checkpoint has no weights; nothing was published")
        # save
        (out / "README.md").write_text(model_card(spec, model.uri, cal, figures))
        parents = [spec.model] + ([spec.calibration_dataset] if spec.calibration_dataset else [])
        writer = ctx.writer("model", spec.name, parents=parents)
        for _ in writer.add_dir(out):
            pass
        metadata = inspect_model(out, allow_trust_remote_code=False) | {
            "form": "quantized", "quantization": f"compressed-tensors {scheme.name}", "quantization_scheme": scheme.name,
            "quantization_format": json.loads((out / "config.json").read_text())["quantization_config"].get("format"),
            "quantized_from": model.uri, "ignore": spec.resolved_ignore, "group_size": spec.group_size,
            "calibration_dataset": cal.dataset_uri if cal else "", "calibration_sha256": cal.sha256 if cal else "",
            "calibration_samples": len(cal.texts) if cal else 0,
            "calibration_max_seq_len": spec.calibration_max_seq_len if cal else 0,
            "calibration_source": spec.calibration_source, "engine": scheme.engine,
            "compute_dtype": "float32" if dtype == "float32" else own or "auto",
            "gpu_only_serving": scheme.gpu_only_serving}
        ctx.commit(writer, metadata=metadata, metrics={k: v for k, v in figures.items()
                                                        if k not in ("quantize_s",)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    run_job("quantization", {"quantization.quantize": (quantize_job, QuantizeSpec)})


if __name__ == "__main__":
    main()
