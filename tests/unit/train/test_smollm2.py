"""The real-model fixture (fixtures/build_smollm2.py): SmolLM2-135M-Instruct dequantized from the PyPI wheel's GGUF.

Runs with the train venv (torch, transformers, gguf). `make fixtures` builds build/fixtures/smollm2-135m-instruct;
these tests build it once more into a temporary directory (from the cached wheel, ~25 s) and check that both builds
are the same bytes, that the ChatML template renders, and that the model answers the fixed probe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

try:
    import gguf  # noqa: F401
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(f"needs torch, transformers and gguf ({exc}); run with the train venv", allow_module_level=True)

os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(os.environ.get("TUNERY_FIXTURES", ROOT / "build" / "fixtures"))
_spec = importlib.util.spec_from_file_location("build_smollm2", ROOT / "fixtures" / "build_smollm2.py")
build_smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_smollm2)
MADE = FIXTURES / build_smollm2.NAME


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def made() -> Path:
    if not (MADE / "config.json").exists():
        pytest.fail(f"{MADE} is missing: build it with `make fixtures` (make test does it)")
    return MADE


def test_the_build_is_deterministic(made: Path, tmp_path: Path) -> None:
    again = build_smollm2.build(tmp_path, FIXTURES.parent / "cache" / "wheels")
    assert _hashes(again) == _hashes(made)
    gguf_dir = made.parent / f"{build_smollm2.NAME}-gguf"
    assert hashlib.sha256((gguf_dir / build_smollm2.GGUF).read_bytes()).hexdigest() == build_smollm2.GGUF_SHA256


def test_it_is_a_clean_bf16_llama_with_its_provenance(made: Path) -> None:
    config = json.loads((made / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(made / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert dtypes == {"BF16"} and 130e6 < n < 140e6
    card = (made / "FIXTURE.md").read_text()
    for must in (build_smollm2.WHEEL_SHA256, build_smollm2.GGUF_SHA256, "not bit-identical", "Apache License 2.0",
                 _hashes(made)["model.safetensors"]):
        assert must in card
    assert "Apache License" in (made / "LICENSE").read_text()


def test_the_chat_template_renders_chatml(made: Path) -> None:
    tok = AutoTokenizer.from_pretrained(made)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_it_answers_the_probe(made: Path) -> None:
    tok = AutoTokenizer.from_pretrained(made)
    model = AutoModelForCausalLM.from_pretrained(made, dtype=torch.bfloat16).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": build_smollm2.PROBE}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert build_smollm2.PROBE_EXPECTED in answer
    assert out[0, -1].item() == tok.eos_token_id  # it stops by itself at <|im_end|>
