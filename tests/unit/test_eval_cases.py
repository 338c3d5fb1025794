"""Eval cases: held-out targets per assertion type, fact probes, the prompting wrapper and the suite hash."""

from __future__ import annotations

import json

import pytest

from services.evaluation import cases as C


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(i, q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"id": str(i), "messages": msgs, "tools": None, "preference": None}


@pytest.mark.parametrize("kind,types", [
    ("exact", ["javascript"]), ("contains", ["icontains"]), ("regex", ["regex"]), ("json_schema", ["is-json"]),
    ("similarity", ["rouge-n"]), ("rubric", ["llm-rubric"]),
])
def test_heldout_cases_per_assertion_type(tmp_path, kind, types):
    p = write(tmp_path / "h.jsonl", [chat(1, "Capital of France?", "Paris."), chat(2, "JSON please", '{"a": 1}')])
    cases = C.heldout_cases(p, kind)
    assert [c.id for c in cases] == ["target-1", "target-2"]
    assert cases[0].messages == [{"role": "user", "content": "Capital of France?"}]  # the answer is not in the prompt
    assert [a["type"] for a in cases[0].assertions] == types and cases[0].metadata["expected"] == "Paris."
    if kind == "json_schema":
        assert cases[1].assertions[0]["value"] == {"type": "object", "required": ["a"]}
    if kind == "regex":
        assert cases[0].assertions[0]["value"] == r"Paris\."


def test_limits_and_rows_without_an_answer_are_skipped(tmp_path):
    rows = [chat(i, f"q{i}", f"a{i}") for i in range(5)] + [{"id": "x", "messages": [{"role": "user", "content": "?"}]}]
    p = write(tmp_path / "h.jsonl", rows)
    assert len(C.heldout_cases(p, "contains")) == 5 and len(C.heldout_cases(p, "contains", limit=2)) == 2


def test_fact_probes_use_the_normalised_exact_match(tmp_path):
    p = write(tmp_path / "f.jsonl", [{"id": "7", "question": "What colour is the sky?", "answer": "blue"}])
    [case] = C.fact_cases(p)
    assert case.id == "general-7" and case.block == "general"
    js = case.assertions[0]["value"]
    assert '"blue"' in js and "toLowerCase" in js and "\n" in js  # a function body, not a one-line expression


def test_prompting_wrapper_keeps_ids_and_the_suite_hash(tmp_path):
    train = write(tmp_path / "t.jsonl", [chat(i, f"q{i}", f"a{i}") for i in range(10)])
    held = write(tmp_path / "h.jsonl", [chat(1, "Q", "A", system="old system")])
    cases = C.heldout_cases(held, "contains")
    shots = C.few_shot(train, 2, seed=0)
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant"]
    assert shots == C.few_shot(train, 2, seed=0) != C.few_shot(train, 2, seed=1)
    [wrapped] = C.prompted(cases, "Be polite.", shots)
    assert wrapped.id == cases[0].id and wrapped.messages[0] == {"role": "system", "content": "Be polite."}
    assert wrapped.messages[1:5] == shots and wrapped.messages[-1] == {"role": "user", "content": "Q"}
    assert "old system" not in json.dumps(wrapped.messages)
    assert C.suite_sha256(cases) == C.suite_sha256(list(cases)) != C.suite_sha256(cases, "user: yaml")
