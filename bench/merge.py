"""The merge: Tunery's streaming merge against PEFT's merge_and_unload + save_pretrained, and against a plain copy of
the same bytes, on one multi-shard Llama made here (random init, never committed) with a LoRA on every linear layer.

    make bench-merge      (.venvs/train/bin/python -m bench.merge [--hidden 1024 --layers 16 --shard-mb 330])

Each side runs in a fresh process of its own (so one side's memory cannot hide another's), one after the other,
the plain copy first and last (its median is the I/O reference; the page cache is warm for every side):
- tunery: services.merging.merge (safe_open one tensor at a time, PEFT's per-module merge, shards written as they
  fill; output shards as large as the base's largest);
- peft:   AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
          (max_shard_size the same);
- copy:   every shard read and written again in 16 MiB blocks.
For each: wall time, peak RSS (VmHWM), and peak RSS above the process's own baseline (the interpreter with torch,
safetensors and PEFT imported, measured before the work starts), so the figures compare the work, not the imports.
Goals (the merging issue): peak RSS above baseline <= 1.5x the largest shard; wall <= 1.3x the plain copy.
Writes build/bench/merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "build" / "fixtures" / "tiny-llama"


def rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Peak RssAnon (memory the process owns) and RssFile (mapped file pages, which the kernel can drop) while the
    work runs; VmHWM is the kernel's own peak of their sum."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            r = rss()
            self.anon, self.file = max(self.anon, r["RssAnon"]), max(self.file, r["RssFile"])

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def make_model(out: Path, hidden: int, layers: int, shard_mb: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out / "base"), max_shard_size=f"{shard_mb}MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, out / "base" / name)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(str(out / "adapter"))


def side(name: str, base: Path, adapter: Path, out: Path, shard_bytes: int) -> dict:
    import torch  # noqa: F401  (the baseline includes what every side imports)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from services.merging.merge import load_adapter, merge

    baseline = rss()["VmRSS"]
    out.mkdir(parents=True)
    t0 = time.monotonic()
    with Sampler() as s:
        if name == "tunery":
            merge(base, load_adapter(adapter), out, "fp32", shard_bytes)
        elif name == "peft":
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            model.save_pretrained(str(out), max_shard_size=shard_bytes)
        else:  # copy
            for shard in sorted(base.glob("*.safetensors")):
                with open(shard, "rb") as src, open(out / shard.name, "wb") as dst:
                    while block := src.read(16 << 20):
                        dst.write(block)
    wall = time.monotonic() - t0
    peak = rss()["VmHWM"]
    return {"side": name, "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline, "above_baseline": peak - baseline,
            "peak_anon": s.anon, "peak_file": s.file,
            "bytes_written": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def run_side(name: str, work: Path, shard_bytes: int, i: int) -> dict:
    out = work / f"out-{name}-{i}"
    proc = subprocess.run([sys.executable, "-m", "bench.merge", "--side", name, "--work", str(work),
                           "--shard-bytes", str(shard_bytes), "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=330)
    ap.add_argument("--side", choices=("tunery", "peft", "copy"))
    ap.add_argument("--work", type=Path)
    ap.add_argument("--shard-bytes", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(side(a.side, a.work / "base", a.work / "adapter", a.out, a.shard_bytes)))
        return
    work = Path(tempfile.mkdtemp(prefix="tunery-bench-merge-"))
    try:
        t0 = time.monotonic()
        make_model(work, a.hidden, a.layers, a.shard_mb)
        shards = sorted((work / "base").glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        total = sum(p.stat().st_size for p in shards)
        print(f"model: {total / 2**20:.0f} MiB in {len(shards)} shards (largest {largest / 2**20:.0f} MiB), LoRA r=16 "
              f"on every linear layer; made in {time.monotonic() - t0:.1f}s")
        runs = [run_side("copy", work, largest, 0), run_side("tunery", work, largest, 0),
                run_side("peft", work, largest, 0), run_side("copy", work, largest, 1)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy = [r for r in runs if r["side"] == "copy"]
    ours = next(r for r in runs if r["side"] == "tunery")
    peft = next(r for r in runs if r["side"] == "peft")
    copy_wall = statistics.median(r["wall_s"] for r in copy)
    mib = lambda b: f"{b / 2**20:7.0f} MiB"  # noqa: E731
    print(f"{'side':8} {'wall':>8} {'peak RSS':>12} {'above base':>12} {'anon peak':>12} {'file peak':>12}")
    for r in (ours, peft, *copy):
        print(f"{r['side']:8} {r['wall_s']:7.2f}s {mib(r['peak_rss'])} {mib(r['above_baseline'])} "
              f"{mib(r['peak_anon'])} {mib(r['peak_file'])}")
    result = {"model_bytes": total, "shards": len(shards), "largest_shard_bytes": largest, "runs": runs,
              "ratios": {"rss_above_baseline_vs_largest_shard": ours["above_baseline"] / largest,
                         "peak_rss_vs_peft": ours["peak_rss"] / peft["peak_rss"],
                         "above_baseline_vs_peft": ours["above_baseline"] / peft["above_baseline"],
                         "wall_vs_copy": ours["wall_s"] / copy_wall, "wall_vs_peft": ours["wall_s"] / peft["wall_s"]}}
    r = result["ratios"]
    print(f"tunery peak RSS above its baseline = {r['rss_above_baseline_vs_largest_shard']:.2f}x the largest shard "
          f"(goal <= 1.5x); {r['above_baseline_vs_peft']:.2f}x PEFT's ({r['peak_rss_vs_peft']:.2f}x in absolute RSS)")
    print(f"tunery wall = {r['wall_vs_copy']:.2f}x the plain copy of the same bytes (goal <= 1.3x); "
          f"{r['wall_vs_peft']:.2f}x PEFT's merge_and_unload + save_pretrained")
    (ROOT / "build" / "bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "build" / "bench" / "merge.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
