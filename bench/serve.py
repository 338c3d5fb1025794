"""Serving: a deployment (Ray Serve + vLLM, through Serve's HTTP proxy) of the SmolLM2-135M-Instruct fixture with 4
LoRA adapters, in one run:

1. time to READY (CreateDeployment until its job ends) and time to first token (a streamed chat);
2. tokens/s of the deployment against bare transformers `generate` (the same model, the same 16 prompts in one
   batch, greedy, the same number of new tokens each): goal >= 5x;
3. many adapters against one: the same load (32 requests, 8 at a time) spread over 4 adapters, and all on one;
   p50 / p95 latency: goal <= 1.5x.

    make bench-serve     (inside a loopback-only namespace, like the tests)

The adapters are random LoRAs (r=8 on every attention and MLP projection) made here with PEFT: serving cost does
not depend on what an adapter learned. Writes build/bench/serve.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.cli.stack import health
from services.core.artifacts import ArtifactStore
from services.core.net import free_port
from services.core.store import LocalObjectStore
from services.gen.tunery.v1 import common_pb2 as pb
from services.registry.service import RegistrySettings
from services.registry.servicer import build as build_registry
from services.serving.service import ServingSettings
from services.serving.servicer import build as build_serving
from services.sdk.client import TuneryClient
from tests.servers import REPO, RayHead, ServerThread, wait_for

MODEL = REPO / "build" / "fixtures" / "smollm2-135m-instruct"
NEW_TOKENS = 64
BATCH = 16
PROMPTS = [f"Write a short note about the number {i}." for i in range(BATCH)]

ADAPTERS = r"""
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    torch.manual_seed(i)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(f"{out}/a{i}")
"""

HF = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)  # the replica's 1 CPU (vLLM CPU runs OMP_NUM_THREADS=1 there)
tok = AutoTokenizer.from_pretrained(src); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in prompts]
batch = tok(texts, return_tensors="pt", padding=True)
t0 = time.monotonic()
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
wall = time.monotonic() - t0
tokens = int((out[:, batch["input_ids"].shape[1]:] != tok.pad_token_id).sum()) if tok.pad_token_id is not None \
    else out.shape[0] * new
print(json.dumps({"wall_s": wall, "tokens": tokens}))
"""


def adapter_artifacts(store: ArtifactStore, base, tmp: Path, n: int) -> list[str]:
    subprocess.run([str(REPO / ".venvs/train/bin/python"), "-c", ADAPTERS, str(MODEL), str(tmp / "adapters"), str(n)],
                   check=True, cwd=REPO, capture_output=True)
    uris = []
    for i in range(n):
        w = store.writer("adapter", f"bench-a{i}", parents=[base.ref()])
        list(w.add_dir(tmp / "adapters" / f"a{i}"))
        m, _ = w.commit({"rank": 8, "method": "lora", "base_architecture": base.metadata.get("architecture", "")})
        uris.append(m.uri)
    return uris


def request(d, model: str, prompt: str, stream: bool = False) -> tuple[float, float, int]:
    """(latency s, time to first chunk s, completion tokens) of one chat request through the deployment."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS,
                       "temperature": 0, "ignore_eos": True, "stream": stream}).encode()
    req = urllib.request.Request(d.base_url + "/chat/completions", data=body, headers={
        "Authorization": f"Bearer {d.api_key}", "Content-Type": "application/json"})
    t0 = time.monotonic()
    first = 0.0
    with urllib.request.urlopen(req, timeout=600) as r:
        if stream:
            for line in r:
                if line.startswith(b"data:") and not first:
                    first = time.monotonic() - t0
            return time.monotonic() - t0, first, NEW_TOKENS
        usage = json.loads(r.read())["usage"]
    return time.monotonic() - t0, 0.0, int(usage["completion_tokens"])


def load(d, models: list[str], n: int = 32, concurrency: int = 8) -> list[float]:
    with ThreadPoolExecutor(concurrency) as pool:
        return [x[0] for x in pool.map(lambda i: request(d, models[i % len(models)], PROMPTS[i % BATCH]), range(n))]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tunery-bench-serve-"))
    head = RayHead({}, num_cpus=2)
    servers = ServerThread()
    out: dict = {}
    try:
        base = dict(project="bench", store_url=f"file://{tmp / 'store'}", ray_address=head.address,
                    auth_tokens="b", port=0, cache_dir=tmp / "cache")
        reg = servers.start(RegistrySettings(**base), build_registry)
        srv = servers.start(ServingSettings(**{**base, "service": "serving", "serve_http_port": free_port(),
                                               "replica_cpus": 1.0}), build_serving)
        for port in (reg, srv):
            wait_for(lambda port=port: health(port) == "SERVING", 30)
        c = TuneryClient(f"127.0.0.1:{reg}", "b", endpoints={"serving": f"127.0.0.1:{srv}"})
        model_uri = c.wait(c.import_model(str(MODEL), "smollm2").id, 300).outputs[0].uri
        store = ArtifactStore(LocalObjectStore(tmp / "store"), "bench")
        adapters = adapter_artifacts(store, store.get(model_uri), tmp, 4)
        t0 = time.monotonic()
        job = c.wait(c.create_deployment("bench", model_uri, {f"a{i}": a for i, a in enumerate(adapters)},
                                         max_model_len=1024).id, 1800)
        out["time_to_ready_s"] = time.monotonic() - t0
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.state_reason
        d = c.get_deployment("bench")
        request(d, "smollm2", "warm up")
        out["time_to_first_token_s"] = statistics.median(request(d, "smollm2", p, stream=True)[1] for p in PROMPTS[:5])
        # tokens/s: 16 requests at once, against HF generate with one batch of 16
        t = time.monotonic()
        with ThreadPoolExecutor(BATCH) as pool:
            tokens = sum(x[2] for x in pool.map(lambda p: request(d, "smollm2", p), PROMPTS))
        out["deployment_tokens_per_s"] = tokens / (time.monotonic() - t)
        hf = subprocess.run([str(REPO / ".venvs/train/bin/python"), "-c", HF, str(MODEL), json.dumps(PROMPTS),
                             str(NEW_TOKENS)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if hf.returncode:
            raise SystemExit(f"HF generate failed:\n{hf.stderr[-3000:]}")
        h = json.loads(hf.stdout.strip().splitlines()[-1])
        out["hf_generate_tokens_per_s"] = h["tokens"] / h["wall_s"]
        out["tokens_per_s_ratio"] = out["deployment_tokens_per_s"] / out["hf_generate_tokens_per_s"]
        # many adapters against one, the same load
        one = load(d, ["a0"])
        many = load(d, ["a0", "a1", "a2", "a3"])
        out |= {"one_adapter_p50_s": pct(one, 0.5), "one_adapter_p95_s": pct(one, 0.95),
                "four_adapters_p50_s": pct(many, 0.5), "four_adapters_p95_s": pct(many, 0.95)}
        out["p50_ratio"] = out["four_adapters_p50_s"] / out["one_adapter_p50_s"]
        out["p95_ratio"] = out["four_adapters_p95_s"] / out["one_adapter_p95_s"]
        c.delete_deployment("bench")
    finally:
        servers.close()
        head.stop()
    for k, v in out.items():
        print(f"{k:28s} {v:10.3f}")
    print(f"goals: tokens/s ratio {out.get('tokens_per_s_ratio', 0):.2f}x (>= 5x), 4 adapters / 1: p50 "
          f"{out.get('p50_ratio', 0):.2f}x, p95 {out.get('p95_ratio', 0):.2f}x (<= 1.5x)")
    dest = REPO / "build" / "bench" / "serve.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
