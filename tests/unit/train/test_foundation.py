"""The committed foundation fixture model (fixtures/foundation, built by fixtures/build_foundation.py).

Needs torch + transformers, so it runs with the train venv:
    .venvs/train/bin/python -m pytest tests/unit/train/test_foundation.py
Under any other interpreter (the control venv has no torch) the whole module is skipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

# Before torch is imported (as fixtures/build_foundation.py does): OpenMP threads sleep instead of spinning, which
# keeps the in-process training fast on a shared 2-core machine; the numerics do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(
        f"needs torch and transformers ({exc}); run with the train venv: infra/scripts/setup-env.sh train && "
        ".venvs/train/bin/python -m pytest tests/unit/train/test_foundation.py",
        allow_module_level=True,
    )

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[3]
FOUNDATION = ROOT / "fixtures" / "foundation"
sys.path.insert(0, str(ROOT / "fixtures"))

import build_foundation
import build_tiny_models

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "facts.jsonl", "foundation.json")
MAX_DIR_BYTES = {"bfloat16": 7_000_000, "float32": 13_000_000}  # the weights: 5.7 MB / 11.5 MB
DETERMINISM_STEPS = 20


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((FOUNDATION / "foundation.json").read_text())


@pytest.fixture(scope="module")
def facts() -> list[dict]:
    return [json.loads(line) for line in (FOUNDATION / "facts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(FOUNDATION, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FOUNDATION, local_files_only=True).eval()


def test_layout_size_and_recorded_digest(info):
    for f in FILES:
        assert (FOUNDATION / f).is_file(), f"fixtures/foundation/{f} missing"
    size = sum(f.stat().st_size for f in FOUNDATION.iterdir() if f.is_file())
    assert size < MAX_DIR_BYTES[info["dtype"]], f"fixtures/foundation is {size} bytes"
    weights = (FOUNDATION / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == info["model_sha256"]
    assert len(weights) == info["model_bytes"]
    for key in ("accuracy", "training", "seed", "versions", "params", "script_version", "dtype"):
        assert key in info, key
    assert info["script_version"] == build_foundation.SCRIPT_VERSION
    assert {"torch", "transformers"} <= set(info["versions"])
    assert info["training"]["steps"] > 0 and info["training"]["wall_time_s"] > 0


def test_config_constraints(info):
    config = json.loads((FOUNDATION / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] == 512
    assert config["dtype"] == info["dtype"] in ("bfloat16", "float32")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert head_dim >= 32  # vLLM's CPU attention
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0  # W4A16, group size 128
    generation = json.loads((FOUNDATION / "generation_config.json").read_text())
    assert generation.get("do_sample", False) is False


def test_loads_with_auto_classes(model, tok, info):
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == getattr(torch, info["dtype"])
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert len(tok) == model.config.vocab_size == 1000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    # the tiny fixtures' chat template and tokenizer builder (trained on the tiny corpus plus the facts)
    assert tok.chat_template == build_tiny_models.CHAT_TEMPLATE
    rebuilt = build_foundation.build_foundation_tokenizer(build_foundation.build_facts(info["seed"]))
    assert tok.get_vocab() == rebuilt.get_vocab()
    for t in build_tiny_models.SPECIAL_TOKENS + build_tiny_models.TOOL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t


def test_facts_are_the_generators(facts, info):
    expected = [build_foundation.public_fact(f) for f in build_foundation.build_facts(info["seed"])]
    assert facts == expected
    assert 250 <= len(facts) <= 400
    assert len({f["id"] for f in facts}) == len(facts)
    assert len({f["question"] for f in facts}) == len(facts)
    assert len({f["category"] for f in facts}) >= 5
    for f in facts:
        assert 1 <= len(f["answer"].split()) <= 3, f
        assert f["messages"] == [{"role": "user", "content": f["question"]},
                                 {"role": "assistant", "content": f["answer"]}]
    assert info["facts"]["count"] == len(facts)


def test_answer_rule():
    match = build_foundation.answer_matches
    assert match(" Paris.", "Paris") and match("paris", "Paris") and match("12\n", "12")
    assert match("a red kite!", "a red kite")
    assert not match("Paris is", "Paris") and not match("1", "12") and not match("", "moo")


def test_greedy_accuracy_matches_recorded(model, tok, facts, info):
    """Recomputed here with an independent loop: the chat template, greedy, 8 new tokens, exact match; in left-padded
    batches of 64 (one prompt at a time gives the same 314 answers, 6x slower)."""
    correct, left = 0, copy.copy(tok)
    left.padding_side = "left"
    for i in range(0, len(facts), 64):
        chunk = facts[i:i + 64]
        texts = [left.apply_chat_template([{"role": "user", "content": f["question"]}], add_generation_prompt=True,
                                          tokenize=False) for f in chunk]
        enc = left(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        for f, got in zip(chunk, left.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            correct += got.strip().rstrip(".,!?;: ").strip().lower() == f["answer"].lower()
    recorded = info["accuracy"]
    assert recorded["total"] == len(facts)
    assert abs(correct - recorded["correct"]) <= 1, (correct, recorded["correct"])
    assert correct >= 0.9 * len(facts), f"{correct}/{len(facts)}"


def test_training_is_deterministic(info):
    """The script's own training function, twice in-process from the same seed: the same loss at every step and
    the same weights; another seed starts elsewhere."""
    gen_facts = build_foundation.build_facts(info["seed"])
    tok = build_foundation.build_foundation_tokenizer(gen_facts)
    kwargs = {"steps": DETERMINISM_STEPS, "batch_size": 8, "warmup_steps": 2, "verbose": False}
    (m1, l1), (m2, l2) = (build_foundation.train(gen_facts, tok, seed=info["seed"], **kwargs) for _ in range(2))
    assert len(l1) == DETERMINISM_STEPS
    assert l1 == l2
    assert sum(l1[-5:]) < sum(l1[:5])  # it learns
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    _, l3 = build_foundation.train(gen_facts, tok, seed=info["seed"] + 1, **{**kwargs, "steps": 2})
    assert l3 != l1[:2]
