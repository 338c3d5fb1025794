"""Prepare throughput against the bare library doing the least of the same work.

A generated alpaca JSONL (100k examples by default, about 1% of them planted near-duplicates) goes through
services.datagen.prepare with a whitespace-counting ChatML tokenizer (the real tokenizer's cost is the model's,
not the library's), and through a bare `json.loads` loop over the same file. Each runs in its own process, so each
peak RSS (ru_maxrss) is its own.

    .venv/bin/python -m bench.prepare_throughput [--n 100000] [--dedup near|exact|none]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class WhitespaceChatML:
    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def count(self, text: str) -> int:
        return len(text.split())


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfgklmnprstvz')}{rng.choice('aeiou')}{rng.choice('bcdfgklmnprstvz')}{i}"
             for i in range(5000)]
    with open(path, "w") as f:
        prev = None
        for i in range(n):
            if prev is not None and rng.random() < 0.01:  # a near-duplicate: one word changed
                row = dict(prev)
                row["output"] = row["output"].replace(" ", f" {rng.choice(vocab)} ", 1)
            else:
                row = {"instruction": " ".join(rng.choices(vocab, k=rng.randint(8, 30))) + "?",
                       "input": " ".join(rng.choices(vocab, k=rng.randint(0, 20))),
                       "output": " ".join(rng.choices(vocab, k=rng.randint(30, 150))) + "."}
            prev = row
            f.write(json.dumps(row) + "\n")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase(name: str, path: Path, dedup: str) -> dict:
    t0 = time.perf_counter()
    if name == "json":
        n = 0
        with open(path, "rb") as f:
            for line in f:
                json.loads(line)
                n += 1
        return {"seconds": time.perf_counter() - t0, "examples": n, "rss_mb": rss_mb()}
    from services.datagen.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory() as out:
        r = prepare(path, Path(out), PrepareOptions(dedup=dedup), WhitespaceChatML())
    assert r.ok, r.summary()
    return {"seconds": time.perf_counter() - t0, "examples": r.num_input, "rss_mb": rss_mb(),
            "kept": r.num_kept, "near_duplicates": r.num_near_duplicates, "exact_duplicates": r.num_exact_duplicates}


def run_phase(name: str, path: Path, dedup: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.prepare_throughput", "--phase", name, "--dedup", dedup,
                          str(path)], check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dedup", default="near", choices=["none", "exact", "near"])
    ap.add_argument("--phase", choices=["json", "prepare"], help=argparse.SUPPRESS)
    ap.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.file), args.dedup)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        generate(path, args.n)
        size_mb = path.stat().st_size / 1e6
        base = run_phase("json", path, args.dedup)
        prep = run_phase("prepare", path, args.dedup)
    print(f"input: {args.n:,} alpaca examples, {size_mb:.0f} MB JSONL; dedup={args.dedup}")
    print(f"bare json.loads : {base['examples'] / base['seconds']:>10,.0f} examples/s  {base['seconds']:6.2f} s  "
          f"peak RSS {base['rss_mb']:6.0f} MB")
    print(f"prepare         : {prep['examples'] / prep['seconds']:>10,.0f} examples/s  {prep['seconds']:6.2f} s  "
          f"peak RSS {prep['rss_mb']:6.0f} MB  (kept {prep['kept']:,}; {prep['exact_duplicates']:,} exact and "
          f"{prep['near_duplicates']:,} near duplicates)")
    print(f"ratio           : prepare takes {prep['seconds'] / base['seconds']:.1f}x the time of bare json.loads; "
          f"peak RSS {prep['rss_mb'] / base['rss_mb']:.1f}x")


if __name__ == "__main__":
    main()
