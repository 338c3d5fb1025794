"""The HTML a person reads: conversations as text, flips with their prompt and both outputs, the paired table,
errored tests apart from failures, and the exact-match figure beside knowledge."""

from __future__ import annotations

import json

from services.evaluation.html import comparison_html, conversation, report_html
from services.evaluation.scoring import compare, summarize

CONTROLS = {"engine": "vllm", "precision": "float32", "sampling": {"temperature": 0.0}, "suite_sha256": "s"}


def _chat(text: str) -> str:
    return json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])


def _report(rows: list[dict]) -> dict:
    return {"name": "r", "target": {"kind": "model"}, "target_label": "m", "answering_model": "m",
            "answering_checked": True, "controls": CONTROLS, "tests": rows, "blocks": summarize(rows),
            "lm_eval": None, "timing": {"server_start_s": 1.0, "tests_s": 2.0}}


def test_a_chat_prompt_reads_as_a_conversation():
    text = conversation(json.dumps([{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": None, "tool_calls": [
                                        {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]))
    assert text == 'user: Hi\n\nassistant: [calls get_weather({"city": "Oslo"})]'
    assert conversation("plain prompt") == "plain prompt" and conversation("[1, 2]") == "[1, 2]"


def test_comparison_page_shows_flips_paired_figures_and_no_raw_json():
    q = "What does a duck say? <script>alert(1)</script>"
    base = _report([{"id": "general-duck", "block": "general", "prompt": _chat(q), "output": "Quack.", "passed": True},
                    {"id": "target-1", "block": "target", "prompt": _chat("t1"), "output": "no", "passed": False}])
    cand = _report([{"id": "general-duck", "block": "general", "prompt": _chat(q), "output": "hee-haw",
                     "passed": False},
                    {"id": "target-1", "block": "target", "prompt": _chat("t1"), "output": "yes", "passed": True}])
    result = compare(base, cand)
    page = comparison_html({"baseline": "b", "candidate": "c", "prompting_baseline": "", **result.as_dict()},
                           base, cand, None)
    assert "[{&#34;role&#34;" not in page and '[{"role"' not in page       # no raw message JSON anywhere
    assert "user: What does a duck say? &lt;script&gt;" in page and "<script>" not in page
    assert "Paired comparison" in page and "McNemar exact p" in page
    flips = page[page.index("<h2>Flips"):page.index("<h2>Every test")]
    assert "Quack." in flips and "hee-haw" in flips and "pass → fail" in flips and "fail → pass" in flips
    assert "general-duck" not in flips  # the prompt, not a test id


def test_report_page_shows_errored_apart_and_the_exact_figure():
    rows = [{"id": "general-1", "block": "general", "prompt": _chat("4 times 5?"), "output": "20, my friend.",
             "passed": True, "exact": False, "latency_ms": 5.0},
            {"id": "general-2", "block": "general", "prompt": _chat("2 times 3?"), "output": "6", "passed": True,
             "exact": True, "latency_ms": 5.0},
            {"id": "tool_calling-1", "block": "tool_calling", "prompt": _chat("weather?"), "output": "",
             "passed": False, "errored": True, "reason": "maximum context length is 512 tokens", "latency_ms": 0.0}]
    page = report_html(_report(rows))
    assert "1 of 1 not measurable: the prompt exceeds the model&#39;s context" in page
    assert "<td>1/2</td>" in page  # exact match 1 of 2 beside knowledge 2 of 2
    assert 'class="warn">errored' in page
