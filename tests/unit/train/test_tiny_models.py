"""The offline tiny-model builder (fixtures/build_tiny_models.py).

Needs torch + transformers, so it runs with the train venv:
    .venvs/train/bin/python -m pytest tests/unit/train/test_tiny_models.py
Under any other interpreter (the control venv has no torch) the whole module is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(
        f"needs torch and transformers ({exc}); run with the train venv: infra/scripts/setup-env.sh train && "
        ".venvs/train/bin/python -m pytest tests/unit/train/test_tiny_models.py",
        allow_module_level=True,
    )

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "fixtures" / "build_tiny_models.py"
MODELS = ("tiny-llama", "tiny-moe")
MAX_DIR_BYTES = 4_000_000  # tiny-llama ~2.3 MB, tiny-moe ~3.5 MB (float32)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
ANSWER = "It is 21 degrees in Paris."
CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": ANSWER},
]
TOOL_CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _build(out: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _digests(model_dir: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(model_dir.iterdir()) if f.is_file()
    }


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """What `make fixtures` built (make test builds them first, with the script's own reload + generate
    self-check); built here, the same way, where they are missing."""
    made = Path(os.environ.get("TUNERY_FIXTURES", ROOT / "build" / "fixtures"))
    if all((made / name / "model.safetensors").is_file() for name in MODELS):
        return made
    out = tmp_path_factory.mktemp("fixtures")
    _build(out)  # both models, with the self-check
    return out


@pytest.fixture(scope="session")
def tok(built):
    return AutoTokenizer.from_pretrained(built / "tiny-llama", local_files_only=True)


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_layout_and_sizes(built):
    for name in MODELS:
        d = built / name
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "tunery_fixture.json"):
            assert (d / f).is_file(), f"{name}/{f} missing"
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        assert size < MAX_DIR_BYTES, f"{name} is {size} bytes"
        info = json.loads((d / "tunery_fixture.json").read_text())
        assert {"architecture", "params", "router_modules", "seed", "script_version"} <= set(info)
        config = json.loads((d / "config.json").read_text())
        assert config["tie_word_embeddings"] is False
        assert config["dtype"] == "float32"
    assert json.loads((built / "tiny-llama" / "tunery_fixture.json").read_text())["architecture"] == "LlamaForCausalLM"
    assert json.loads((built / "tiny-moe" / "tunery_fixture.json").read_text())["architecture"] == "Qwen2MoeForCausalLM"


def test_deterministic_across_builds(built, tmp_path):
    _build(tmp_path, "--no-check")
    for name in MODELS:
        first, second = _digests(built / name), _digests(tmp_path / name)
        assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(first)
        assert first == second, f"{name} differs between two builds"
    # the tokenizer is the same in both model directories
    assert _digests(built / "tiny-llama")["tokenizer.json"] == _digests(built / "tiny-moe")["tokenizer.json"]


def test_only_builds_one_model(tmp_path, built):
    _build(tmp_path, "--only", "llama", "--no-check")
    assert (tmp_path / "tiny-llama" / "model.safetensors").is_file()
    assert not (tmp_path / "tiny-moe").exists()
    assert _digests(tmp_path / "tiny-llama") == _digests(built / "tiny-llama")


def test_tokenizer_tokens(tok):
    assert len(tok) == 1000
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|pad|>"
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<tool_call>", "</tool_call>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, (t, ids)
    assert tok.decode(tok.encode('{"city": "Paris"}', add_special_tokens=False)) == '{"city": "Paris"}'


def test_chat_template_basic(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_tools(tok):
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a weather bot.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in system
    assert "<|im_start|>assistant\n" + TOOL_CALL_TEXT + "<|im_end|>\n" in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n" + ANSWER + "<|im_end|>\n")
    # arguments given as a JSON string render unchanged
    as_string = [*CONVERSATION[:2], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    assert TOOL_CALL_TEXT in tok.apply_chat_template(as_string, tools=TOOLS, tokenize=False)


def test_chat_template_stored_with_tokenizer(built, tok):
    d = built / "tiny-llama"
    stored = (d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").exists() else \
        json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    assert "{% generation %}" in stored and "{% endgeneration %}" in stored
    assert tok.chat_template == stored


def test_assistant_mask_covers_only_assistant_content(tok):
    enc = tok.apply_chat_template(
        CONVERSATION, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(mask) == len(ids)
    assert sum(mask) > 0
    spans = _spans(mask)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [TOOL_CALL_TEXT + "<|im_end|>", ANSWER + "<|im_end|>"]
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert ANSWER not in unmasked and "get_weather\", \"arguments\"" not in unmasked
    assert "What is the weather in Paris?" in unmasked


def test_moe_router_modules_exist(built):
    d = built / "tiny-moe"
    info = json.loads((d / "tunery_fixture.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    modules = dict(model.named_modules())
    assert info["router_modules"] == [f"model.layers.{i}.mlp.gate" for i in range(model.config.num_hidden_layers)]
    for name in info["router_modules"]:
        assert name in modules, name
        assert tuple(modules[name].weight.shape) == (model.config.num_experts, model.config.hidden_size)
    assert json.loads((built / "tiny-llama" / "tunery_fixture.json").read_text())["router_modules"] == []


@pytest.mark.parametrize("name", MODELS)
def test_models_load_and_generate(built, name):
    d = built / name
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    assert model.dtype == torch.float32
    enc = tok.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**enc).logits
        assert logits.shape == (1, enc["input_ids"].shape[1], len(tok))
        assert torch.isfinite(logits).all()
        out1 = model.generate(**enc, max_new_tokens=5, do_sample=False)
        out2 = model.generate(**enc, max_new_tokens=5, do_sample=False)
    new = out1[0, enc["input_ids"].shape[1]:]
    assert 1 <= new.numel() <= 5
    assert torch.equal(out1, out2)
