"""Eval scoring: Wilson intervals, controlled comparisons, flips, gates, the prompting-baseline verdict."""

from __future__ import annotations

import pytest

from services.evaluation.scoring import (
    Gates,
    UncontrolledComparison,
    compare,
    control_mismatches,
    newcombe_difference,
    paired_difference,
    summarize,
    wilson,
)

CONTROLS = {"engine": "vllm", "engine_version": "0.32.0", "precision": "float32", "quantization": "",
            "chat_template_sha256": "abc", "sampling": {"temperature": 0.0, "seed": 0, "max_tokens": 32},
            "suite_sha256": "s1", "tool_call_parser": "hermes", "lora_enabled": True}


def report(passes: dict[str, bool], outputs: dict[str, str] | None = None, *, errored: set[str] = frozenset(),
           prompts: dict[str, str] | None = None, **controls) -> dict:
    tests = [{"id": i, "block": i.split("-")[0], "passed": p, "output": (outputs or {}).get(i, f"out {i} {p}"),
              "errored": i in errored, "prompt": (prompts or {}).get(i, i),
              "reason": "This model's maximum context length is 512 tokens" if i in errored else ""}
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
    c = compare(base, cand, gates=Gates(min_target_pass_rate=0.9, max_general_drop_points=60,
                                        require_target_gain=False))
    assert sorted((f["test_id"], f["now_passes"]) for f in c.flips) == [
        ("general-2", False), ("target-1", True), ("target-2", True)]
    assert c.block_deltas["target"] == pytest.approx(2 / 3) and c.block_deltas["general"] == pytest.approx(-0.5)
    assert c.verdict == "pass" and not c.uncontrolled and not c.adapter_had_no_effect
    strict = compare(base, cand, gates=Gates(min_target_pass_rate=0.9, max_general_drop_points=2))
    assert strict.verdict == "fail"
    assert any(r.startswith("general forgetting 50.0 points (1 of 2 lost, 0 gained) > gate 2")
               for r in strict.verdict_reasons), strict.verdict_reasons
    # 2 of 3 gained is not a gain beyond the noise (McNemar p = 0.5), so the default target gate refuses it
    assert any("not a gain beyond the noise" in r for r in strict.verdict_reasons)


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
    beats = compare(base, cand, prompting=weak)
    assert beats.beats_prompting_baseline is True and "paired, McNemar" in beats.verdict_reasons[-1]
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


def _facts(n: int, passes) -> dict[str, bool]:
    return {f"general-{i}": passes(i) for i in range(n)}


def test_gibberish_with_no_gates_is_not_a_pass():
    """The outside finding: no gate flags, an adapter that answered gibberish (target 0/52, general 0/60), and
    the old defaults (0% target, 100-point drop) said PASS."""
    base = report({**{f"target-{i}": False for i in range(52)}, **_facts(60, lambda i: i < 45)})
    cand = report({**{f"target-{i}": False for i in range(52)}, **_facts(60, lambda i: False)},
                  outputs={f"target-{i}": "zx qq zx" for i in range(52)} | {f"general-{i}": "qq" for i in range(60)})
    c = compare(base, cand)
    assert c.default_gates and c.verdict == "fail"
    assert c.verdict_reasons[0].startswith("default gates (none given): target gain beyond the noise")
    assert any("target +0.0%" in r and "not a gain beyond the noise" in r for r in c.verdict_reasons)
    assert any(r.startswith("general forgetting 75.0 points (45 of 60 lost") for r in c.verdict_reasons)
    # worse (or no better) everywhere, even with gates that would let anything through: never a PASS
    lax = compare(base, cand, gates=Gates(max_general_drop_points=100, max_tool_calling_drop_points=100,
                                          require_target_gain=False))
    assert lax.verdict == "fail"


def test_worse_on_every_block_is_never_a_pass():
    base = report({**{f"target-{i}": i < 10 for i in range(20)}, **_facts(20, lambda i: i < 10)})
    cand = report({**{f"target-{i}": i < 9 for i in range(20)}, **_facts(20, lambda i: i < 9)})
    c = compare(base, cand, gates=Gates(max_general_drop_points=100, require_target_gain=False))
    assert c.verdict == "fail" and any(r.startswith("worse on every block measured") and r.endswith("never a PASS")
                                       for r in c.verdict_reasons)


def test_the_default_gates_pass_a_real_gain_without_forgetting():
    base = report({**{f"target-{i}": i < 2 for i in range(20)}, **_facts(40, lambda i: i != 0)})
    cand = report({**{f"target-{i}": i < 17 for i in range(20)}, **_facts(40, lambda i: True)})
    c = compare(base, cand)
    assert c.verdict == "pass", c.verdict_reasons
    target = next(p for p in c.paired if p["block"] == "target")
    assert (target["gained"], target["lost"], target["pairs"]) == (15, 0, 20) and target["ci_low"] > 0
    assert target["mcnemar_p"] == pytest.approx(2 * 0.5 ** 15)


def test_forgetting_counts_losses_that_gains_elsewhere_do_not_cancel():
    # 5 probes lost and 5 others gained: the net drop is 0, the forgetting is 5 of 50
    base = report({**{f"target-{i}": False for i in range(10)}, **_facts(50, lambda i: i < 40)},
                  prompts={f"general-{i}": f"What is fact {i}?" for i in range(50)})
    cand = report({**{f"target-{i}": True for i in range(10)}, **_facts(50, lambda i: 5 <= i < 45)},
                  outputs={f"general-{i}": f"hee-haw {i}" for i in range(5)})
    c = compare(base, cand)
    general = next(p for p in c.paired if p["block"] == "general")
    assert general["difference"] == 0 and general["forgetting_points"] == pytest.approx(10.0)
    assert general["lost_tests"] == [f"general-{i}" for i in range(5)]
    line = next(r for r in c.verdict_reasons if r.startswith("general forgetting"))
    assert line.startswith("general forgetting 10.0 points (5 of 50 lost, 5 gained) > gate 2: lost ")
    assert "“What is fact 0?” → “hee-haw 0”" in line and line.endswith(" …")  # three named, the rest elided
    assert c.verdict == "fail"


def test_errored_tests_are_not_failures_and_decide_no_gate():
    tests = [{"id": f"tool_calling-{i}", "block": "tool_calling", "passed": i == 0, "errored": i > 1,
              "reason": "API error: 400 This model's maximum context length is 512 tokens; your prompt contains "
                        "at least 513" if i > 1 else ""} for i in range(10)]
    blocks = summarize(tests)
    assert (blocks["tool_calling"]["passed"], blocks["tool_calling"]["total"]) == (1, 2)
    assert blocks["tool_calling"]["errored_reason"] == "8 of 10 not measurable: the prompt exceeds the model's context"
    # every tool test errored on the candidate: the block is not measured, so it neither passes nor fails a gate
    base = report({**{f"target-{i}": False for i in range(20)}, **{f"tool_calling-{i}": True for i in range(10)}})
    cand = report({**{f"target-{i}": True for i in range(20)}, **{f"tool_calling-{i}": False for i in range(10)}},
                  errored={f"tool_calling-{i}" for i in range(10)})
    c = compare(base, cand)
    assert not [p for p in c.paired if p["block"] == "tool_calling"]
    assert any(r.startswith("tool_calling block not measured on both sides (10 of 10 not measurable")
               for r in c.verdict_reasons)
    assert c.verdict == "pass", c.verdict_reasons
    assert all(f["block"] != "tool_calling" for f in c.flips)


def test_paired_difference_uses_mcnemar_and_a_binomial_interval():
    from scipy.stats import binomtest

    d, low, high, p = paired_difference(10, 2, 40)
    assert d == pytest.approx(8 / 40) and p == pytest.approx(binomtest(10, 12, 0.5).pvalue)
    ci = binomtest(10, 12, 0.5).proportion_ci(method="wilson")
    assert (low, high) == pytest.approx(((2 * ci.low - 1) * 12 / 40, (2 * ci.high - 1) * 12 / 40))
    assert 0 < low < d < high
    # tighter than Newcombe's interval for two independent rates (the same 40 tests, 30 vs 22 passed)
    _, n_low, n_high = newcombe_difference(30, 40, 22, 40)
    assert high - low < n_high - n_low
    # nothing discordant: no change seen, but not proof of none
    d0, l0, h0, p0 = paired_difference(0, 0, 40)
    assert d0 == 0 and p0 == 1 and l0 == pytest.approx(-wilson(0, 40)[1]) and h0 == pytest.approx(wilson(0, 40)[1])
    with pytest.raises(ValueError):
        paired_difference(30, 20, 40)


def test_a_form_comparison_allows_only_precision_quantization_and_engine_and_gates_on_tests_lost():
    from services.evaluation.scoring import compare_forms

    passes = {f"target-{i}": i < 40 for i in range(50)} | {f"general-{i}": True for i in range(50)}
    merged = report(passes, precision="float32 (BF16 weights)")
    same_answers = {k: f"out {k} {v}" for k, v in passes.items()}
    # the quantized form: one target test lost, one gained; two answers worded differently but still right
    q_pass = dict(passes) | {"target-0": False, "target-45": True}
    q_out = same_answers | {"general-1": "reworded", "general-2": "reworded", "target-0": "wrong", "target-45": "right"}
    quantized = report(q_pass, q_out, precision="auto (BF16 weights)", quantization="compressed-tensors gptq-w4a16")
    c = compare_forms(merged, quantized, max_drop_points=2)
    assert c.form_comparison and c.verdict == "pass" and not c.uncontrolled
    assert c.form_differences == ["precision: 'float32 (BF16 weights)' vs 'auto (BF16 weights)'",
                                  "quantization: '' vs 'compressed-tensors gptq-w4a16'"]
    assert c.greedy_agreement == pytest.approx(96 / 100)  # target-0, target-45, general-1, general-2 differ
    paired = {p["block"]: p for p in c.paired}
    assert (paired["target"]["lost"], paired["target"]["gained"], paired["target"]["forgetting_points"]) == (1, 1, 2.0)
    # a gain does not buy a loss back: two lost of 50 is 4 points, over the gate
    worse = report(q_pass | {"target-1": False}, q_out, precision="auto", quantization="q")
    w = compare_forms(merged, worse, max_drop_points=2)
    assert w.verdict == "fail" and any(r.startswith("target") and "4.0 points lost > 2" in r for r in w.verdict_reasons)
    # anything else differing is not a form comparison
    with pytest.raises(UncontrolledComparison) as e:
        compare_forms(merged, report(q_pass, quantization="q", chat_template_sha256="other"))
    assert e.value.mismatches == ["chat_template_sha256: 'abc' vs 'other'"]
    # no target measured: never a pass
    only_general = {k: v for k, v in passes.items() if k.startswith("general")}
    assert compare_forms(report(only_general), report(only_general, quantization="q")).verdict == "fail"
