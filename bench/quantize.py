"""The quantize job's memory: llmcompressor's oneshot (GPTQ W4A16, the sequential pipeline) on a model of at least
1 GB made here (random init, never committed), with the job's loading (services.quantization.job.load: weights
beyond a resident budget offloaded to local disk, onloaded a layer at a time) against llmcompressor's default
(the whole model loaded in RAM), each in a fresh process of its own, the same calibration data.

    make bench-quantize   (.venvs/quantize/bin/python -m bench.quantize [--hidden 2048 --layers 8 --samples 16])

For each: wall time, peak RSS (VmHWM) and the peak above the process's baseline (the interpreter with torch,
transformers and llmcompressor imported, measured before loading), and the planner's estimate for the job.
Goal (the quantization issue): the job's peak RSS above baseline <= 0.5x the model's bf16 size.
Writes build/bench/quantize.json.

    .venvs/quantize/bin/python -m bench.quantize --gguf [--model DIR]

GGUF instead: the job's two steps (llama.cpp's converter to a float GGUF, then llama_model_quantize to Q4_K_M) on a
model (default: the SmolLM2 fixture) against reading its safetensors bytes once (what any tool must do at least),
each timed in this process; writes build/bench/quantize-gguf.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "build" / "fixtures" / "tiny-llama"

WORKER = r"""
import json, sys, time, threading
sys.path.insert(0, sys.argv[4])
from bench.merge import Sampler, rss
import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
from services.quantization import job as J
from services.quantization.spec import QuantizeSpec
src, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
samples, resident = int(sys.argv[5]), int(sys.argv[6])
J.without_pinning()
tok = AutoTokenizer.from_pretrained(src)
texts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i} times {i + 3}?"},
                                  {"role": "assistant", "content": f"{i * (i + 3)}, my friend."}], tokenize=False)
         for i in range(samples)]
data = Dataset.from_dict({"text": texts}).map(lambda r: tok(r["text"], add_special_tokens=False, truncation=True,
                                                            max_length=128), remove_columns=["text"])
spec = QuantizeSpec(scheme="gptq-w4a16", resolved_ignore=["lm_head"], group_size=128)
base = rss()["VmRSS"]
s = Sampler(); s._t.start()
t0 = time.monotonic()
if mode == "tunery":
    model = J.load(src, resident, __import__("pathlib").Path(out) / "offload")
else:
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
oneshot(model=model, dataset=data, recipe=J.build_recipe(spec), num_calibration_samples=samples,
        max_seq_length=128, pipeline="sequential")
model.save_pretrained(out + "/q", save_compressed=True, max_shard_size=J.MAX_SHARD)
wall = time.monotonic() - t0
s._stop.set(); s._t.join()
peak = rss()["VmHWM"]
print(json.dumps({"wall_s": wall, "peak_rss": peak, "baseline_rss": base, "above_baseline": peak - base,
                  "anon_peak": s.anon}))
"""


def make_model(dest: Path, hidden: int, layers: int, inter: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 256 or 1,
                         vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=2, pad_token_id=3, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest, max_shard_size="512MB")
    for f in TOKENIZER.glob("*"):
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, dest / f.name)
    return sum(p.stat().st_size for p in dest.glob("*.safetensors"))


def planned(model_dir: Path, samples: int) -> int:
    from services.core.weights import read_header
    from services.quantization import architecture
    from services.quantization.schemes import SCHEMES
    from services.quantization.service import QuantizationService, QuantizationSettings

    flat = {}
    for p in model_dir.glob("*.safetensors"):
        with open(p, "rb") as f:
            flat |= read_header(lambda o, n, f=f: (f.seek(o), f.read(n))[1], p.stat().st_size, str(p))
    arch = architecture.read(json.loads((model_dir / "config.json").read_text()), flat)
    svc = QuantizationService(None, None, QuantizationSettings(project="bench", port=0))
    from services.quantization.spec import QuantizeSpec

    spec = QuantizeSpec(scheme="gptq-w4a16", num_calibration_samples=samples, calibration_max_seq_len=128)
    return svc.memory_plan(SCHEMES["gptq-w4a16"], arch, flat, spec).peak


def bench_gguf(model_dir: Path) -> dict:
    import time

    from services.core.llama_cpp import LlamaCpp, Toolchain

    toolchain = Toolchain()
    if toolchain.missing():
        raise SystemExit(toolchain.missing())
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-gguf-"))
    try:
        files = sorted(model_dir.glob("*.safetensors"))
        t0 = time.monotonic()
        size = 0
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    size += len(chunk)
        read_s = time.monotonic() - t0
        t0 = time.monotonic()
        toolchain.convert(model_dir, work / "float.gguf", "f32")
        convert_s = time.monotonic() - t0
        t0 = time.monotonic()
        LlamaCpp(toolchain).quantize(work / "float.gguf", work / "q4_k_m.gguf", "gguf-q4_k_m")
        quantize_s = time.monotonic() - t0
        out = (work / "q4_k_m.gguf").stat().st_size
        r = {"model": str(model_dir), "model_bytes": size, "read_s": read_s, "convert_s": convert_s,
             "quantize_s": quantize_s, "output_bytes": out,
             "ratios": {"convert_plus_quantize_over_read": (convert_s + quantize_s) / max(read_s, 1e-9),
                        "compression": size / out}}
        print(f"read {size / 2**20:.0f} MiB in {read_s:.2f}s; convert {convert_s:.1f}s + Q4_K_M {quantize_s:.1f}s "
              f"-> {out / 2**20:.0f} MiB ({size / out:.2f}x smaller); "
              f"{r['ratios']['convert_plus_quantize_over_read']:.0f}x the read", flush=True)
        return r
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", action="store_true", help="GGUF conversion + Q4_K_M against a raw read (see above)")
    ap.add_argument("--model", type=Path, default=ROOT / "build" / "fixtures" / "smollm2-135m-instruct")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--resident-mb", type=int, default=256)
    args = ap.parse_args()
    if args.gguf:
        dest = ROOT / "build" / "bench" / "quantize-gguf.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(bench_gguf(args.model), indent=1))
        return
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-quantize-"))
    try:
        src = work / "model"
        size = make_model(src, args.hidden, args.layers, args.inter, args.vocab)
        print(f"model: {size / 2**30:.2f} GiB bf16 ({args.layers} layers, hidden {args.hidden})", flush=True)
        results = {"model_bytes": size, "planned_peak_bytes": planned(src, args.samples)}
        for mode in ("tunery", "default"):
            out = work / mode
            out.mkdir()
            proc = subprocess.run([sys.executable, "-c", WORKER, str(src), mode, str(out), str(ROOT),
                                   str(args.samples), str(args.resident_mb << 20)], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} failed: {proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:8s} wall {r['wall_s']:.1f}s  peak RSS {r['peak_rss'] / 2**20:.0f} MiB  above baseline "
                  f"{r['above_baseline'] / 2**20:.0f} MiB ({r['above_baseline'] / size:.2f}x the model)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        t, d = results["tunery"], results["default"]
        results["ratios"] = {"tunery_above_baseline_over_model": t["above_baseline"] / size,
                             "default_above_baseline_over_model": d["above_baseline"] / size,
                             "tunery_peak_over_default_peak": t["peak_rss"] / d["peak_rss"],
                             "tunery_wall_over_default_wall": t["wall_s"] / d["wall_s"],
                             "tunery_peak_over_planned": t["peak_rss"] / results["planned_peak_bytes"]}
        print(json.dumps(results["ratios"], indent=1))
        dest = ROOT / "build" / "bench" / "quantize.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
