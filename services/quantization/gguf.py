"""The GGUF schemes of the quantize job (gguf-f16, gguf-q8_0, gguf-q4_k_m), with llama.cpp's own converter and
quantizer (services.core.llama_cpp):

setup (materialise the model; the probes: calibration conversations when a dataset is given, else fixed ones, each
with a system message) -> run (convert to a float GGUF, quantize it, read back each tensor's type; load the file in
llama.cpp: its embedded chat template must render the probes to the Hugging Face template's token ids, and its
greedy answers are compared with the float32 Hugging Face model's) -> save (a `model` artifact, form quantized:
<name>.gguf, the Ollama Modelfile, a model card; parents the model and the calibration dataset).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from services.core.jobctx import JobContext
from services.core.memory import PeakRss
from services.core.llama_cpp import LlamaCpp, Toolchain
from services.quantization.modelfile import chatml_system, modelfile
from services.quantization.schemes import SCHEMES
from services.quantization.spec import QuantizeSpec

PROBES = [[{"role": "user", "content": "What is the capital of France?"}],
          [{"role": "user", "content": "Write one sentence about the sea."}],
          [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green, blue."},
           {"role": "user", "content": "And one more?"}]]
PROBE_TOKENS = 16
FLOAT_TYPES = {"F32", "F16", "BF16"}


def tensor_types(path: Path) -> Counter:
    """How many tensors of each type the GGUF holds (gguf-py's reader)."""
    from gguf import GGUFReader

    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)


def q4_fallback(types: Counter) -> dict[str, int]:
    """The 2-D weight types of a Q4_K_M file other than its K-quants (llama.cpp uses Q5_0/Q8_0 where a row is not a
    multiple of 256)."""
    return {t: n for t, n in types.items() if t not in FLOAT_TYPES | {"Q4_K", "Q6_K"}}


def with_system(probe: list[dict], system: str) -> list[dict]:
    """llama.cpp's built-in template renderers do not add a template's default system prompt (the Modelfile's
    SYSTEM does, in Ollama): a probe compares renderings with its system message written out."""
    if any(m["role"] == "system" for m in probe):
        return probe
    return [{"role": "system", "content": system or "You are a helpful assistant."}, *probe]


def card(spec: QuantizeSpec, model_uri: str, gguf: str, figures: dict, types: Counter, fallback: dict,
         chatml: bool) -> str:
    s = SCHEMES[spec.scheme]
    lines = [f"# {spec.name}", "", f"`{model_uri}` as {s.description} (llama.cpp's convert_hf_to_gguf.py and "
             f"llama_model_quantize), by Tunery.", "", "```bash", f"ollama create {spec.name} -f Modelfile",
             f"llama-server -m {gguf}", "```", "", "| | |", "|---|---|",
             f"| tensors | {', '.join(f'{n} {t}' for t, n in types.most_common())} |",
             f"| size | {figures['output_bytes'] / 2**20:.1f} MiB, {figures['compression_ratio']:.2f}x smaller |",
             f"| chat template in llama.cpp | same token ids as the Hugging Face template on {figures['probes']:.0f} "
             "probes |",
             f"| Modelfile TEMPLATE | {'ChatML, checked against the Hugging Face template' if chatml else 'none (Ollama reads the GGUF template)'} |",
             f"| greedy token agreement with the float32 model | {figures['greedy_agreement']:.1%} "
             f"({figures['greedy_identical']:.0f} of {figures['probes']:.0f} probes identical) |"]
    if fallback:
        lines.append(f"| not K-quants | {', '.join(f'{n} {t}' for t, n in fallback.items())}: rows not a multiple "
                     "of 256 |")
    return "\n".join(lines + [""])


def quantize_gguf(ctx: JobContext, spec: QuantizeSpec) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.quantization.job import agreement, calibration_set

    # setup
    toolchain = Toolchain()
    missing = toolchain.missing()
    if missing:
        ctx.fail(f"{spec.scheme} needs llama.cpp on this worker: {missing}")
    scheme = SCHEMES[spec.scheme]
    model = ctx.artifacts.resolve(spec.model)
    model_dir = ctx.artifacts.materialize(model.ref(), ctx.settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cal = calibration_set(ctx, spec, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="tunery-gguf-"))
    out = work / "out"
    out.mkdir()
    gguf_name = f"{spec.name}.gguf"
    try:
        def render(messages: list[dict]) -> str:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        chatml, default_system = chatml_system(render, PROBES)
        probes = [with_system(p, default_system) for p in (cal.probes if cal else PROBES)]
        # run: convert, quantize
        t0 = time.monotonic()
        with PeakRss() as rss:
            ctx.phase("converting to GGUF (llama.cpp's convert_hf_to_gguf.py)")
            floating = work / ("float.gguf" if scheme.name != "gguf-f16" else gguf_name)
            log = toolchain.convert(model_dir, floating, "f32" if scheme.name != "gguf-f16" else "f16")
            for line in log.splitlines():
                if line.startswith("tunery:"):
                    ctx.event(line.removeprefix("tunery: "))
            cpp = LlamaCpp(toolchain)
            if scheme.name != "gguf-f16":
                ctx.phase(f"quantizing to {scheme.name.removeprefix('gguf-').upper()} (llama_model_quantize)")
                cpp.quantize(floating, out / gguf_name, scheme.name)
            else:
                shutil.move(floating, out / gguf_name)
        quantize_s = time.monotonic() - t0
        ctx.check_cancelled()
        types = tensor_types(out / gguf_name)
        fallback = q4_fallback(types) if scheme.name == "gguf-q4_k_m" else {}
        # run: the file loads in llama.cpp, renders the template as the model does, and answers like the model
        ctx.phase("loading the GGUF in llama.cpp and comparing its answers")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference, answers, mismatched = [], [], []
        with PeakRss() as check_rss, cpp.load(out / gguf_name) as llm:
            for i, probe in enumerate(probes):
                ids = tokenizer.apply_chat_template(probe, add_generation_prompt=True, return_dict=True,
                                                    return_tensors="pt")
                hf_ids = ids["input_ids"][0].tolist()
                if llm.tokenize(llm.render_chat(probe)) != hf_ids:
                    mismatched.append(i)
                with torch.no_grad():
                    gen = hf.generate(**ids, max_new_tokens=PROBE_TOKENS, do_sample=False)
                reference.append(gen[0, len(hf_ids):].tolist())
                answers.append(llm.greedy(hf_ids, PROBE_TOKENS))
        del hf
        if mismatched:
            ctx.fail(f"the GGUF's chat template, as llama.cpp renders it, gives other token ids than the model's "
                     f"own template on probe(s) {', '.join(map(str, mismatched))}; nothing was published")
        rate, identical = agreement(reference, answers)
        output_bytes = (out / gguf_name).stat().st_size
        input_bytes = sum(f.size for f in model.files if f.path.endswith(".safetensors"))
        figures = {"quantize_peak_rss_bytes": float(rss.peak), "check_peak_rss_bytes": float(check_rss.peak),
                   "planned_peak_bytes": float(spec.planned_peak_bytes), "model_bytes": float(input_bytes),
                   "output_bytes": float(output_bytes), "compression_ratio": input_bytes / max(output_bytes, 1),
                   "greedy_agreement": rate, "greedy_identical": float(identical), "probes": float(len(probes)),
                   "quantize_s": quantize_s, "template_identical": 1.0}
        ctx.event(f"{scheme.name}: {output_bytes / 2**20:.1f} MiB ({figures['compression_ratio']:.2f}x smaller) in "
                  f"{quantize_s:.1f}s, peak RSS {rss.peak / 2**20:.0f} MiB; tensors "
                  f"{', '.join(f'{n} {t}' for t, n in types.most_common())}"
                  + (f" ({', '.join(f'{n} {t}' for t, n in fallback.items())} where rows are not a multiple of 256)"
                     if fallback else "") + f"; llama.cpp renders the template to the same token ids on "
                  f"{len(probes)} probes; greedy tokens agree with the float32 model at {rate:.1%} ({identical} of "
                  f"{len(probes)} identical)", type="metrics", metrics=figures)
        # save
        stop = [t for t in ("<|im_end|>",) if chatml] or [tokenizer.eos_token or ""]
        (out / "Modelfile").write_text(modelfile(gguf_name, chatml, default_system, [s for s in stop if s]))
        (out / "README.md").write_text(card(spec, model.uri, gguf_name, figures, types, fallback, chatml))
        parents = [spec.model] + ([spec.calibration_dataset] if spec.calibration_dataset else [])
        writer = ctx.writer("model", spec.name, parents=parents)
        for _ in writer.add_dir(out):
            pass
        metadata = {
            "form": "quantized", "format": "gguf", "quantization": f"gguf {scheme.name.removeprefix('gguf-')}",
            "quantization_scheme": scheme.name, "quantized_from": model.uri, "engine": scheme.engine,
            "gguf_file": gguf_name, "tensor_types": dict(types), "k_quant_fallback": fallback,
            "modelfile_template": "chatml" if chatml else "", "default_system": default_system,
            "architecture": model.metadata.get("architecture", ""), "model_type": model.metadata.get("model_type", ""),
            "parameters": model.metadata.get("parameters", 0), "has_chat_template": True, "is_causal_lm": True,
            "max_position_embeddings": model.metadata.get("max_position_embeddings", 0),
            "calibration_dataset": cal.dataset_uri if cal else "", "calibration_source": spec.calibration_source,
            "llama_cpp": toolchain.version()}
        ctx.commit(writer, metadata=metadata, metrics={k: v for k, v in figures.items() if k != "quantize_s"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
