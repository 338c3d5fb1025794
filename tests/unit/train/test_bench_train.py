"""bench/train_throughput at a very small size: the job's fit() (packed) and the two bare TRL scripts (padded, and
packing=True) each train in a process of their own, and the result has the structure the benchmark prints and saves,
peak memory included. Never asserts speed or a ratio.

Needs torch/transformers/peft/trl, so it runs with the train venv:
    .venvs/train/bin/python -m pytest tests/unit/train/test_bench_train.py
Under any other interpreter (the control venv has no torch) the whole module is skipped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

try:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import trl  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(f"needs the train venv ({exc}): .venvs/train/bin/python -m pytest {__file__}",
                allow_module_level=True)

from bench.train_throughput import BenchConfig, length_stats, make_examples, packing_isolation, run_benchmark  # noqa: E402

FIXTURE = Path(os.environ.get("TUNERY_FIXTURES", Path(__file__).resolve().parents[3] / "build" / "fixtures"))
TINY = FIXTURE / "tiny-llama"

pytestmark = pytest.mark.skipif(not (TINY / "config.json").is_file(), reason=f"{TINY} missing: run `make fixtures`")


def test_synthetic_chats_have_varied_lengths():
    from transformers import AutoTokenizer

    from services.training.sft import tokenize_example

    tok = AutoTokenizer.from_pretrained(TINY)
    rows = make_examples(300, seed=0)
    assert make_examples(300, seed=0) == rows  # deterministic
    lengths = [len(tokenize_example(tok, r, True)["input_ids"]) for r in rows]
    stats = length_stats(lengths)
    assert stats["min"] < 80 and stats["p50"] < 200 and stats["p90"] > 250, stats  # short Q/A and a long tail
    assert all(any(m["role"] == "assistant" for m in r["messages"]) for r in rows)


def test_packed_sequences_do_not_see_each_other():
    got = packing_isolation(str(TINY))
    assert got["max_abs_logit_diff"] < 1e-4, got


def test_every_side_trains_and_the_result_has_its_structure(tmp_path):
    cfg = BenchConfig(examples=64, holdout=16, repeats=1, learning_rate=3e-3, checkpoint_every=4, model=str(TINY))
    out = tmp_path / "train_throughput.json"
    result = run_benchmark(cfg, out, verbose=False)

    assert json.loads(out.read_text())["summary"]["versus"]["trl"]["ratio"] == pytest.approx(
        result["summary"]["versus"]["trl"]["ratio"])
    assert out.with_suffix(".png").is_file()
    assert set(result) >= {"config", "libraries", "data", "packing_isolation", "runs", "summary"}
    tokens = result["data"]["train_tokens"]
    assert result["data"]["train_examples"] == 64 and tokens > 64 * 49

    runs = {r["side"]: r for r in result["runs"]}
    assert set(runs) == {"job", "trl", "trl-packed"} and len(result["runs"]) == 3
    base = result["summary"]["base_eval_loss"]
    for side, r in runs.items():
        assert r["steps"] > 0 and r["train_s"] > 0 and r["train_cpu_s"] > 0 and r["tokens_per_s"] > 0, side
        assert r["tokens"] == tokens
        assert r["trl_num_tokens"] == tokens, (side, r["trl_num_tokens"])  # every real token, once, on every side
        assert r["checkpoints"] >= 1, side
        losses = [loss for _, loss in r["curve"]]
        assert len(losses) == r["steps"] and all(math.isfinite(x) for x in losses), side
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"]), side
        # every side trained: the held-out loss fell below the untrained base's, and the train loss went down
        assert r["eval_loss"] < base - 0.05, (side, r["eval_loss"], base)
        assert sum(losses[-2:]) / 2 < losses[0], (side, losses)
        # memory: each run is a process of its own, its high-water mark reset as train() starts, so the peak
        # during training is at least what was resident when it started, and below the process's lifetime peak
        assert r["peak_rss_reset"], side
        assert 0 < r["rss_before_train_bytes"] <= r["peak_rss_bytes"] <= r["peak_rss_process_bytes"], side
        assert r["measured_train_bytes"] == r["peak_rss_bytes"] - r["rss_before_train_bytes"]
        plan = r["planned_train_bytes"]
        assert 0 < plan["fused"] <= plan["full"], (side, plan)
    # the job sizes packed micro-batches in examples, so it takes about as many steps per epoch as the padded
    # script; TRL's packing=True fills micro_batch_size rows of max_length tokens, so it takes far fewer
    assert 0.5 * runs["trl"]["steps"] <= runs["job"]["steps"] <= 2 * runs["trl"]["steps"], runs
    assert runs["trl-packed"]["steps"] < runs["job"]["steps"], runs
    assert runs["trl-packed"]["rows_per_step"] == 4 and runs["job"]["rows_per_step"] == 1  # 4 x ~150 tokens

    s = result["summary"]
    assert set(s["versus"]) == {"trl", "trl-packed"}
    for v in s["versus"].values():
        for key in ("ratio", "cpu_ratio", "eval_loss_diff_pct", "train_loss_diff_pct", "peak_rss_ratio"):
            assert math.isfinite(v[key]) and v[key] != 0, key
    for side in ("job", "trl", "trl-packed"):
        assert set(s[side]) >= {"tokens_per_s", "tokens_per_cpu_s", "steps", "train_loss", "eval_loss",
                                "peak_rss_bytes"}


def test_a_chatml_template_without_markers_gets_them(tmp_path):
    """SmolLM2's ChatML template marks no assistant turn; the benchmark runs it with a marked copy (links to the
    same weights), so assistant-only loss trains the same tokens the template renders."""
    from transformers import AutoTokenizer

    from bench.train_throughput import with_generation_markers
    from services.training.sft import tokenize_example

    smol = FIXTURE / "smollm2-135m-instruct"
    assert with_generation_markers(TINY, tmp_path) == TINY  # already marked
    if not (smol / "config.json").is_file():
        pytest.fail(f"{smol} missing: run `make fixtures`")
    marked = with_generation_markers(smol, tmp_path)
    assert marked != smol and (marked / "model.safetensors").resolve() == (smol / "model.safetensors").resolve()
    ex = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."}]}
    plain, tok = AutoTokenizer.from_pretrained(smol), AutoTokenizer.from_pretrained(marked)
    assert plain.apply_chat_template(ex["messages"], tokenize=False) == tok.apply_chat_template(ex["messages"],
                                                                                               tokenize=False)
    row = tokenize_example(tok, ex, True)
    trained = tok.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
    assert trained == "Hello, friend.<|im_end|>"
