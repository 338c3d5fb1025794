"""Eval scoring: Wilson intervals, controlled comparisons, flips, gates, the prompting-baseline verdict."""

from __future__ import annotations

import pytest

from services.evaluation.scoring import (
    Gates,
    UncontrolledComparison,
    compare,
    control_mismatches,
    newcombe_difference,
    summarize,
    wilson,
)

CONTROLS = {"engine": "vllm", "engine_version": "0.32.0", "precision": "float32", "quantization": "",
            "chat_template_sha256": "abc", "sampling": {"temperature": 0.0, "seed": 0, "max_tokens": 32},
            "suite_sha256": "s1", "tool_call_parser": "hermes", "lora_enabled": True}


def report(passes: dict[str, bool], outputs: dict[str, str] | None = None, **controls) -> dict:
    tests = [{"id": i, "block": i.split("-")[0], "passed": p, "output": (outputs or {}).get(i, f"out {i} {p}")}
             for i, p in passes.items()]
    return {"controls": {**CONTROLS, **controls}, "tests": tests, "blocks": summarize(tests)}


def test_wilson_matches_published_values():
    # Newcombe (1998) table I: 0/10 -> 0 .. 0.2775; 5/10 -> 0.2366 .. 0.7634; 29/29 -> 0.8830 .. 1
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(29, 29) == pytest.approx((0.8830, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)  # no tests: no information


def test_newcombe_difference_matches_published_value():
    # Newcombe (1998) table II, example (a): 56/70 vs 48/80 -> 0.2000, method 10: 0.0524 .. 0.3339
    d, low, high = newcombe_difference(56, 70, 48, 80)
    assert d == pytest.approx(0.2) and low == pytest.approx(0.0524, abs=1e-3) and high == pytest.approx(0.3339, abs=1e-3)


def test_flips_deltas_and_a_passing_verdict():
    base = report({"target-1": False, "target-2": False, "target-3": True, "general-1": True, "general-2": True,
                   "tool_calling-1": True})
    cand = report({"target-1": True, "target-2": True, "target-3": True, "general-1": True, "general-2": False,
                   "tool_calling-1": True})
    c = compare(base, cand, gates=Gates(min_target_pass_rate=0.9, max_general_drop_points=60))
    assert sorted((f["test_id"], f["now_passes"]) for f in c.flips) == [
        ("general-2", False), ("target-1", True), ("target-2", True)]
    assert c.block_deltas["target"] == pytest.approx(2 / 3) and c.block_deltas["general"] == pytest.approx(-0.5)
    assert c.verdict == "pass" and not c.uncontrolled and not c.adapter_had_no_effect
    strict = compare(base, cand, gates=Gates(min_target_pass_rate=0.9, max_general_drop_points=2))
    assert strict.verdict == "fail" and any("general drop +50.0 points > gate 2" in r for r in strict.verdict_reasons)


def test_differing_controls_are_refused_unless_allowed():
    base = report({"target-1": False})
    cand = report({"target-1": True}, precision="bfloat16", sampling={"temperature": 0.7, "seed": 0, "max_tokens": 32})
    with pytest.raises(UncontrolledComparison) as e:
        compare(base, cand)
    assert any("precision: 'float32' vs 'bfloat16'" in m for m in e.value.mismatches)
    assert any(m.startswith("sampling: temperature 0.0 vs 0.7") for m in e.value.mismatches)
    c = compare(base, cand, allow_uncontrolled=True)
    assert c.uncontrolled and any(r.startswith("UNCONTROLLED") for r in c.verdict_reasons)
    assert control_mismatches(CONTROLS, dict(CONTROLS)) == []


def test_an_adapter_that_changed_nothing_is_flagged():
    outs = {"target-1": "same", "target-2": "same too"}
    c = compare(report({"target-1": True, "target-2": False}, outs), report({"target-1": True, "target-2": False}, outs))
    assert c.adapter_had_no_effect and c.verdict == "fail" and c.identical_outputs == c.common_tests == 2


def test_prompting_baseline_verdict():
    cand = report({f"target-{i}": i < 18 for i in range(20)})
    weak = report({f"target-{i}": i < 4 for i in range(20)})
    strong = report({f"target-{i}": i < 16 for i in range(20)})
    base = report({f"target-{i}": False for i in range(20)})
    assert compare(base, cand, prompting=weak).beats_prompting_baseline is True
    close = compare(base, cand, prompting=strong)
    assert close.beats_prompting_baseline is False and "not more than the noise" in close.verdict_reasons[-1]
    assert compare(base, cand).beats_prompting_baseline is None


def test_wilson():
    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    lo, hi = wilson(50, 100)
    assert abs((lo + hi) / 2 - 0.5) < 1e-9 and round(lo, 3) == 0.404
    with pytest.raises(ValueError):
        wilson(3, 2)
