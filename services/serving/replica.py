"""One replica of a deployment: a Ray Serve deployment class that runs vLLM's OpenAI server (the serve venv's
python, `services.core.vllm.VLLMServer`) on 127.0.0.1 and passes Serve's HTTP requests through to it, streaming.

- Serve gives the replicas, the routing between them, autoscaling (scale to zero included) and health checks; this
  class only starts the engine and forwards bytes.
- The adapters are the application's `user_config`: Serve calls `reconfigure` after `__init__` and again whenever
  they change, without restarting the replica; it diffs them against what the engine holds and loads or unloads
  through vLLM's runtime LoRA endpoints. A request naming an unloaded adapter gets vLLM's 404.
- The API key is vLLM's (`VLLM_API_KEY`): a request without it gets 401 from the engine itself.
- `/metrics` is vLLM's Prometheus endpoint (no key).

Runs in the Ray workers' own python (the control venv): it imports no vllm, torch or transformers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("tunery.serving")

# what a client may send the engine, and what comes back (hop-by-hop and length headers are Serve's business)
FORWARD_REQUEST = ("authorization", "content-type", "accept")
DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


REPLICA_HEADER = "x-tunery-replica"  # which replica answered (Serve routes each request to one)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a unit test)
        return f"pid-{os.getpid()}"


def _store():
    from services.core.artifacts import ArtifactStore
    from services.core.settings import StoreSettings
    from services.core.store import open_store

    settings = StoreSettings()
    return ArtifactStore(open_store(settings), settings.project), settings.cache_dir


class VLLMReplica:
    """`config`: the replica's fixed part (services.serving.job.replica_config); `user_config`: {"adapters":
    {name: {"uri", "sha256"}}}."""

    def __init__(self, config: dict[str, Any]):
        from services.core.artifacts import ArtifactRef
        from services.core.settings import RaySettings
        from services.core.vllm import ServerSpec, VLLMServer, cpu_cannot_run

        self.config = config
        self.replica_id = _replica_id()
        self.artifacts, self.cache = _store()
        scheme = self.artifacts.resolve(ArtifactRef(**config["model"])).metadata.get("quantization_scheme", "")
        why = cpu_cannot_run(str(scheme), config.get("device", "cpu"))
        if why:  # before an engine that would start, then die on the first request
            raise RuntimeError(why)
        model_dir = self.artifacts.materialize(ArtifactRef(**config["model"]), self.cache)
        spec = ServerSpec(model_dir=str(model_dir), served_name=config["served_name"], runtime_lora=True,
                          max_loras=config["max_loras"], max_lora_rank=config["max_lora_rank"],
                          tool_call_parser=config.get("tool_call_parser", ""), dtype=config.get("dtype", "auto"),
                          max_model_len=config.get("max_model_len", 0), device=config.get("device", "cpu"),
                          kv_cache_bytes=config["kv_cache_bytes"],
                          gpu_memory_utilization=config["gpu_memory_utilization"],
                          tensor_parallel_size=config.get("tensor_parallel_size", 1), api_key=config["api_key"],
                          # /tokenize and /tokenizer_info: lm-eval's log-likelihood tasks score a deployment as they
                          # score every other form (the pipeline evaluates what clients get with the same suite)
                          extra_args=["--enable-tokenizer-info-endpoint"])
        log_dir = Path(self.cache) / "serving-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.server = VLLMServer(spec, python=RaySettings().python_for("serve"),
                                 log_path=log_dir / f"{config['name']}-{os.getpid()}.log",
                                 startup_timeout=config.get("startup_timeout_s", 900))
        self.server.start()
        self.loaded: dict[str, str] = {}   # adapter name -> its sha256, as the engine holds them
        self._lock = asyncio.Lock()
        self._client = None

    # ------------------------------------------------------------------ Serve hooks
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        wanted = {name: ref for name, ref in (user_config or {}).get("adapters", {}).items()}
        async with self._lock:
            for name in [n for n in self.loaded if n not in wanted or wanted[n]["sha256"] != self.loaded[n]]:
                await self._lora("unload_lora_adapter", {"lora_name": name})
                del self.loaded[name]
            for name, ref in wanted.items():
                if name in self.loaded:
                    continue
                path = await asyncio.to_thread(self._materialize, ref)
                await self._lora("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
                self.loaded[name] = ref["sha256"]

    async def check_health(self) -> None:
        if not self.server.running():
            raise RuntimeError(f"the vLLM server exited; last lines of its log:\n{self.server.log_tail()}")
        async with self.client().get(f"http://127.0.0.1:{self.server.port}/health") as response:
            if response.status != 200:
                raise RuntimeError(f"vLLM /health answered {response.status}")

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()

    async def __call__(self, request):
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        path = request.url.path
        prefix = request.scope.get("root_path", "") or f"/{self.config['name']}"
        if path.startswith(prefix + "/") or path == prefix:
            path = path[len(prefix):] or "/"
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST}
        response = await self.client().request(request.method, f"http://127.0.0.1:{self.server.port}{path}",
                                               params=list(request.query_params.multi_items()), headers=headers,
                                               data=await request.body())
        kept = {k: v for k, v in response.headers.items() if k.lower() not in DROP_RESPONSE}
        kept[REPLICA_HEADER] = self.replica_id

        async def body():
            async for chunk in response.content.iter_any():
                yield chunk

        return StreamingResponse(body(), status_code=response.status, headers=kept,
                                 background=BackgroundTask(response.release))

    # ------------------------------------------------------------------ helpers
    def client(self):
        """One aiohttp session per replica (made in Serve's event loop; aiohttp comes with ray[default])."""
        if self._client is None:
            import aiohttp

            self._client = aiohttp.ClientSession(auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._client

    def _materialize(self, ref: dict[str, str]) -> Path:
        from services.core.artifacts import ArtifactRef

        return self.artifacts.materialize(ArtifactRef(**ref), self.cache)

    async def _lora(self, endpoint: str, body: dict[str, str]) -> None:
        async with self.client().post(f"http://127.0.0.1:{self.server.port}/v1/{endpoint}", json=body,
                                      headers=self.server.auth_headers()) as response:
            if response.status != 200:
                raise RuntimeError(f"vLLM {endpoint} {json.dumps(body)} answered {response.status}: "
                                   f"{(await response.text())[:500]}")
        log.info("%s %s", endpoint, body["lora_name"])
