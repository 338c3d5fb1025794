"""Scoring and comparison of eval reports: pure Python, no engine, no grpc.

A report (report.json) holds per-test results, per-block pass rates with 95% Wilson intervals, and the run's
*controls*: everything that must be equal for two runs to be compared with the adapter (or the quantization, or
the prompt) as the only difference.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BLOCKS = ("target", "general", "tool_calling")
# What must match between a baseline and a candidate. `prompting` (system prompt + few-shot) is deliberately not a
# control: it is what the prompting-baseline comparison varies.
CONTROL_KEYS = ("engine", "engine_version", "precision", "quantization", "chat_template_sha256", "sampling",
                "suite_sha256", "tool_call_parser", "lora_enabled", "lm_eval")


def wilson(passed: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate (sound at 0 and n; Agresti & Coull 1998); (0, 1) with no tests."""
    if total < 0 or passed < 0 or passed > total:
        raise ValueError(f"wilson: need 0 <= passed <= total, got {passed}/{total}")
    if total == 0:
        return 0.0, 1.0
    p = passed / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(p1: int, n1: int, p2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference of two independent pass rates (1 minus 2) with Newcombe's hybrid score interval (method 10,
    Newcombe 1998): (difference, low, high). The difference is "more than the noise" when low > 0."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, 0.0, 0.0
    a, b = p1 / n1, p2 / n2
    l1, u1 = wilson(p1, n1, z)
    l2, u2 = wilson(p2, n2, z)
    d = a - b
    low = d - math.sqrt((a - l1) ** 2 + (u2 - b) ** 2)
    high = d + math.sqrt((u1 - a) ** 2 + (b - l2) ** 2)
    return d, low, high


def paired_difference(gained: int, lost: int, pairs: int, z: float = 1.96) -> tuple[float, float, float, float]:
    """The same tests on both sides: (difference, low, high, McNemar p). The difference is (gained - lost) / pairs;
    McNemar's exact test is scipy's binomial test of the discordant pairs against 1/2; the 95% interval is the
    conditional one: scipy's Wilson interval of gained / (gained + lost), mapped onto the difference. With no
    discordant pairs the difference is 0, and its interval spans the discordance rate that could have gone unseen
    (the upper Wilson bound of 0 in `pairs`): no change seen is not proof of none."""
    from scipy.stats import binomtest

    if pairs <= 0:
        return 0.0, 0.0, 0.0, 1.0
    if gained < 0 or lost < 0 or gained + lost > pairs:
        raise ValueError(f"paired_difference: need gained + lost <= pairs, got {gained} + {lost} > {pairs}")
    m = gained + lost
    if m == 0:
        hi = wilson(0, pairs, z)[1]
        return 0.0, -hi, hi, 1.0
    test = binomtest(gained, m, 0.5)
    ci = test.proportion_ci(confidence_level=0.95, method="wilson")
    scale = m / pairs
    low, high = float((2 * ci.low - 1) * scale), float((2 * ci.high - 1) * scale)
    return (gained - lost) / pairs, low, high, float(test.pvalue)


# What an errored test's message means, for the block's "not measurable" line.
_ERROR_KINDS = (
    (re.compile(r"maximum context length|context length|too many tokens|prompt is too long", re.I),
     "the prompt exceeds the model's context"),
    (re.compile(r"timed? ?out|timeout", re.I), "the request timed out"),
    (re.compile(r"ECONNREFUSED|ECONNRESET|fetch failed|socket hang up|connection", re.I),
     "the server could not be reached"),
    (re.compile(r"\b5\d\d\b|internal server error", re.I), "the server answered with an error"),
)


def error_kind(message: str) -> str:
    for pattern, kind in _ERROR_KINDS:
        if pattern.search(message or ""):
            return kind
    first = (message or "unknown error").strip().splitlines()[0]
    return first if len(first) <= 100 else first[:99] + "…"


def errored_reason(rows: list[dict[str, Any]]) -> str:
    """ "8 of 10 not measurable: the prompt exceeds the model's context" (the commonest kind first)."""
    bad = [t for t in rows if t.get("errored")]
    if not bad:
        return ""
    kinds = Counter(error_kind(str(t.get("reason", ""))) for t in bad).most_common()
    return f"{len(bad)} of {len(rows)} not measurable: " + "; ".join(
        k if n == len(bad) else f"{k} ({n})" for k, n in kinds)


def summarize(tests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per block: passed/total/pass_rate/ci_low/ci_high over the tests that were measured; `errored` (requests or
    gradings that failed: not counted as failures) with its reason; and, where tests carry an exact-match figure
    beside their score (fact probes), exact_passed/exact_total."""
    out: dict[str, dict[str, Any]] = {}
    for block in BLOCKS:
        rows = [t for t in tests if t["block"] == block]
        if not rows:
            continue
        measured = [t for t in rows if not t.get("errored")]
        passed = sum(1 for t in measured if t["passed"])
        low, high = wilson(passed, len(measured))
        b: dict[str, Any] = {"passed": passed, "total": len(measured),
                             "pass_rate": passed / len(measured) if measured else 0.0, "ci_low": low, "ci_high": high,
                             "errored": len(rows) - len(measured), "errored_reason": errored_reason(rows)}
        exact = [t for t in measured if t.get("exact") is not None]
        if exact:
            b["exact_passed"], b["exact_total"] = sum(1 for t in exact if t["exact"]), len(exact)
        out[block] = b
    return out


def control_mismatches(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...] = CONTROL_KEYS) -> list[str]:
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if va != vb:
            if isinstance(va, dict) and isinstance(vb, dict):
                diff = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
                out.append(f"{key}: " + ", ".join(f"{k} {va.get(k)!r} vs {vb.get(k)!r}" for k in diff))
            else:
                out.append(f"{key}: {va!r} vs {vb!r}")
    return out


@dataclass
class Gates:
    """What a candidate must do to PASS. The defaults are what a comparison with no gates uses: the target gains
    beyond the noise (the paired 95% interval of the gain above 0) and at most 2 points of forgetting (the share of
    general or tool-calling tests lost; gains elsewhere do not buy losses back)."""

    min_target_pass_rate: float = 0.0
    max_general_drop_points: float = 2.0
    max_tool_calling_drop_points: float = 2.0
    require_target_gain: bool = True

    def check(self) -> None:
        """ValueError naming the field that is out of range (NaN included)."""
        if not 0.0 <= self.min_target_pass_rate <= 1.0:
            raise ValueError(f"gates.min_target_pass_rate must be a rate in [0, 1], got {self.min_target_pass_rate}")
        for name in ("max_general_drop_points", "max_tool_calling_drop_points"):
            v = getattr(self, name)
            if not 0.0 <= v <= 100.0:
                raise ValueError(f"gates.{name} must be points in [0, 100], got {v}")

    def describe(self) -> str:
        parts = [f"target ≥ {self.min_target_pass_rate:.0%}"] if self.min_target_pass_rate else []
        if self.require_target_gain:
            parts.append("target gain beyond the noise")
        parts += [f"general forgetting ≤ {self.max_general_drop_points:g} points",
                  f"tool-calling forgetting ≤ {self.max_tool_calling_drop_points:g} points"]
        return ", ".join(parts)


@dataclass
class Comparison:
    control_mismatches: list[str]
    uncontrolled: bool
    flips: list[dict[str, Any]]
    block_deltas: dict[str, float]
    verdict: str                      # "pass" | "fail"
    verdict_reasons: list[str]
    beats_prompting_baseline: bool | None
    prompting: dict[str, float] = field(default_factory=dict)
    adapter_had_no_effect: bool = False
    identical_outputs: int = 0
    common_tests: int = 0
    lm_eval_deltas: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)
    default_gates: bool = False
    form_comparison: bool = False
    form_differences: list[str] = field(default_factory=list)
    greedy_agreement: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _measured(t: dict[str, Any] | None) -> bool:
    return t is not None and not t.get("errored")


Pair = tuple[dict[str, Any], dict[str, Any]]


def matched(before: list[dict[str, Any]], after: list[dict[str, Any]],
            keep: Callable[[dict[str, Any]], bool] = lambda t: True) -> list[Pair]:
    """The tests both sides ran and measured (neither errored), as (before, after) in `after`'s order; `keep`
    selects by the after side. Every paired figure below counts on these."""
    first = {t["id"]: t for t in before}
    return [(first[t["id"]], t) for t in after if keep(t) and _measured(t) and _measured(first.get(t["id"]))]


def gained_lost(pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """The discordant pairs: (fail -> pass, pass -> fail)."""
    return ([(b, c) for b, c in pairs if c["passed"] and not b["passed"]],
            [(b, c) for b, c in pairs if b["passed"] and not c["passed"]])


def paired_blocks(baseline: dict[str, Any], candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """Per block, the tests both reports ran and measured (neither side errored): gained, lost, the paired
    difference with its interval and McNemar's p, and forgetting (lost / pairs, in points)."""
    out = []
    for block in BLOCKS:
        pairs = matched(baseline["tests"], candidate["tests"], lambda t, blk=block: t["block"] == blk)
        if not pairs:
            continue
        gained, lost = gained_lost(pairs)
        d, low, high, p = paired_difference(len(gained), len(lost), len(pairs))
        out.append({"block": block, "pairs": len(pairs), "gained": len(gained), "lost": len(lost),
                    "difference": d, "ci_low": low, "ci_high": high, "mcnemar_p": p,
                    "forgetting_points": 100.0 * len(lost) / len(pairs), "lost_tests": [c["id"] for _, c in lost],
                    "lost_examples": [_example(b, c) for b, c in lost[:3]]})
    return out


def _short(text: Any, n: int = 40) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[:n - 1] + "…"


def _example(b: dict[str, Any], c: dict[str, Any]) -> str:
    """A lost test as a person reads it: what was asked, what was expected, what came back."""
    msgs = chat_messages(b.get("prompt", ""))
    users = [str(m.get("content") or "") for m in msgs or [] if m["role"] == "user"]
    asked = _short(users[-1] if users else b.get("prompt", ""), 50)
    want = f" (expected {_short(b['expected'], 20)})" if b.get("expected") else ""
    return f"“{asked}”{want} → “{_short(c.get('output'), 40)}”"


def chat_messages(prompt: Any) -> list[dict[str, Any]] | None:
    """A test's prompt as chat messages (promptfoo records them as JSON), or None when it is plain text."""
    try:
        msgs = json.loads(prompt) if isinstance(prompt, str) else prompt
    except ValueError:
        return None
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs):
        return msgs
    return None


def _task_pairs(baseline: dict[str, Any], candidate: dict[str, Any], task: str) -> tuple[int, int, int] | None:
    """An lm-eval task's documents as pairs (gained, lost, pairs), where both reports hold them as tests."""
    pre = f"lm-eval/{task}/"
    pairs = matched(baseline.get("tests") or [], candidate.get("tests") or [], lambda t: t["id"].startswith(pre))
    if not pairs:
        return None
    gained, lost = gained_lost(pairs)
    return len(gained), len(lost), len(pairs)


def lm_eval_deltas(baseline: dict[str, Any], candidate: dict[str, Any], z: float = 1.96) -> list[dict[str, Any]]:
    """Per lm-eval task both reports ran: the primary metric, candidate minus baseline, with a 95% interval.
    Where the metric is a pass rate over the task's documents (each a test on both sides: acc, exact_match), the
    paired interval of the same documents (paired_difference); otherwise a normal interval from lm-eval's two
    standard errors (as if independent: conservative for the same documents), and without them the point itself.
    `worse`: the interval lies wholly on the bad side (by the metric's higher_is_better)."""
    b_tasks = (baseline.get("lm_eval") or {}).get("tasks") or {}
    c_tasks = (candidate.get("lm_eval") or {}).get("tasks") or {}
    out = []
    for name, c in c_tasks.items():
        b = b_tasks.get(name)
        if not b or b.get("primary") != c.get("primary") or b.get("value") is None or c.get("value") is None:
            continue
        d = float(c["value"]) - float(b["value"])
        higher = c.get("higher_is_better")
        higher = True if higher is None else bool(higher)
        (pc, nc), (pb, nb) = _task_counts(candidate, name), _task_counts(baseline, name)
        pairs = _task_pairs(baseline, candidate, name)
        se_b, se_c = b.get("primary_stderr"), c.get("primary_stderr")
        paired = (pairs is not None and nc == nb == pairs[2] and abs(pc / nc - float(c["value"])) < 1e-9
                  and abs(pb / nb - float(b["value"])) < 1e-9)
        if paired:
            d, low, high, _ = paired_difference(*pairs, z=z)
            known = True
        else:
            known = isinstance(se_b, (int, float)) and isinstance(se_c, (int, float))
            half = z * math.sqrt(se_b ** 2 + se_c ** 2) if known else 0.0
            low, high = d - half, d + half
        worse = known and (high < 0 if higher else low > 0)
        out.append({"task": name, "metric": str(c["primary"]), "baseline": float(b["value"]),
                    "candidate": float(c["value"]), "delta": d, "ci_low": low, "ci_high": high, "worse": worse})
    return out


def _task_counts(report: dict[str, Any], task: str) -> tuple[int, int]:
    rows = [t for t in report.get("tests") or [] if t["id"].startswith(f"lm-eval/{task}/")]
    return sum(1 for t in rows if t["passed"]), len(rows)


class UncontrolledComparison(Exception):
    def __init__(self, mismatches: list[str]):
        super().__init__("; ".join(mismatches))
        self.mismatches = mismatches


def _vs_prompting(candidate: dict[str, Any], prompting: dict[str, Any]) -> tuple[bool | None, dict[str, float], str]:
    """Does the candidate beat the prompting baseline on the target block? Paired when both ran the same target
    tests (they do: the prompting baseline wraps the same cases), Newcombe's interval otherwise."""
    c_blocks, p_blocks = candidate["blocks"], prompting["blocks"]
    if "target" not in p_blocks or "target" not in c_blocks:
        return None, {}, ""
    def is_target(t: dict[str, Any]) -> bool:
        return t["block"] == "target"

    if {t["id"] for t in prompting["tests"] if is_target(t)} == {t["id"] for t in candidate["tests"] if is_target(t)}:
        pairs = matched(prompting["tests"], candidate["tests"], is_target)
        gained, lost = gained_lost(pairs)
        d, low, high, pv = paired_difference(len(gained), len(lost), len(pairs))
        how = f"paired, McNemar p={pv:.2g}"
    else:
        c, p = c_blocks["target"], p_blocks["target"]
        d, low, high = newcombe_difference(int(c["passed"]), int(c["total"]), int(p["passed"]), int(p["total"]))
        how = "Newcombe, different tests"
    beats = low > 0
    stats = {"prompted_pass_rate": p_blocks["target"]["pass_rate"], "difference": d, "ci_low": low, "ci_high": high}
    return beats, stats, (f"vs prompting baseline: {d:+.1%} (95% CI {low:+.1%} .. {high:+.1%}, {how}): "
                          + ("the adapter beats base + prompt + few-shot" if beats else
                             "not more than the noise; would a good prompt have been enough?"))


# what two forms of one model may differ in: base + adapter (LoRA on the engine) is a form of its merge, proved equal
def _flips(base_tests: dict[str, dict], cand_tests: dict[str, dict], common: list[str]) -> list[dict[str, Any]]:
    """The tests measured on both sides whose verdict changed, with the prompt and both outputs."""
    return [{"test_id": i, "block": cand_tests[i]["block"], "now_passes": bool(cand_tests[i]["passed"]),
             "prompt": cand_tests[i].get("prompt", ""), "baseline_output": base_tests[i].get("output", ""),
             "candidate_output": cand_tests[i].get("output", "")}
            for i in common if _measured(base_tests[i]) and _measured(cand_tests[i])
            and bool(base_tests[i]["passed"]) != bool(cand_tests[i]["passed"])]


def _lost_text(p: dict[str, Any]) -> str:
    """': lost “…” → “…”; …' for a paired block that lost tests (a few examples), else ''."""
    if not p["lost"]:
        return ""
    return ": lost " + "; ".join(p["lost_examples"]) + (" …" if p["lost"] > len(p["lost_examples"]) else "")


# what two forms of one model may differ in (stated in the comparison): the engine and its build, the precision and
# quantization, LoRA on the engine, and the tool-call parser (llama.cpp's server has none; a suite with tool calls is
# refused for a GGUF form before it runs, so no test depends on it)
FORM_KEYS = ("engine", "engine_version", "precision", "quantization", "lora_enabled", "tool_call_parser")
DEFAULT_FORM_DROP_POINTS = 2.0


def compare_forms(baseline: dict[str, Any], candidate: dict[str, Any], *,
                  max_drop_points: float = DEFAULT_FORM_DROP_POINTS) -> Comparison:
    """Two forms of one model on the same suite (base + adapter or the full-precision merge vs its quantization, or
    vLLM vs llama.cpp): only precision, quantization, engine and LoRA-on-the-engine may differ, and the comparison states them. A form is as
    good as the other when no block loses more than `max_drop_points` of its tests (the share the baseline form
    passed and the candidate fails; gains are the noise of rounding, they buy nothing back); the target block must
    be measured. Also reported: the share of tests whose outputs are identical (greedy agreement)."""
    same = tuple(k for k in CONTROL_KEYS if k not in FORM_KEYS)
    mismatches = control_mismatches(baseline["controls"], candidate["controls"], same)
    if mismatches:
        raise UncontrolledComparison(mismatches)
    differences = control_mismatches(baseline["controls"], candidate["controls"], FORM_KEYS)
    base_tests = {t["id"]: t for t in baseline["tests"]}
    cand_tests = {t["id"]: t for t in candidate["tests"]}
    common = [i for i in cand_tests if i in base_tests]
    identical = sum(1 for i in common if base_tests[i].get("output") == cand_tests[i].get("output"))
    flips = _flips(base_tests, cand_tests, common)
    paired = paired_blocks(baseline, candidate)
    agreement = identical / len(common) if common else 0.0
    reasons = [f"form comparison, gate: at most {max_drop_points:g} points of any block's tests lost",
               "the forms differ in " + ("; ".join(differences) if differences else "nothing recorded")]
    ok = any(p["block"] == "target" for p in paired)
    if not ok:
        reasons.append("target block not measured on both forms: no verdict can pass")
    for p in paired:
        good = p["forgetting_points"] <= max_drop_points + 1e-9
        ok &= good
        lost = _lost_text(p)
        reasons.append(f"{p['block']} {p['difference']:+.1%} ({p['lost']} of {p['pairs']} lost, {p['gained']} gained; "
                       f"{p['forgetting_points']:.1f} points lost {'≤' if good else '>'} {max_drop_points:g}){lost}")
    reasons.append(f"greedy agreement: {identical} of {len(common)} outputs identical ({agreement:.0%})")
    harness = lm_eval_deltas(baseline, candidate)
    for d in harness:
        reasons.append(f"lm-eval {d['task']} {d['metric']}: {d['baseline']:.3f} → {d['candidate']:.3f} "
                       f"({d['delta']:+.3f}, 95% CI {d['ci_low']:+.3f} .. {d['ci_high']:+.3f})")
    return Comparison([], False, flips, {p["block"]: p["difference"] for p in paired}, "pass" if ok else "fail",
                      reasons, None, {}, False, identical, len(common), harness, paired, False, True, differences,
                      agreement)


def compare(baseline: dict[str, Any], candidate: dict[str, Any], *, gates: Gates | None = None,
            prompting: dict[str, Any] | None = None, allow_uncontrolled: bool = False) -> Comparison:
    """Baseline vs candidate (and, optionally, the prompting baseline), test by test: both sides ran the same
    tests, so the statistics are paired. Raises UncontrolledComparison when the controls differ, unless allowed
    (then the comparison is stamped uncontrolled). No gates: the defaults of Gates, said in the reasons."""
    default_gates = gates is None
    gates = gates or Gates()
    mismatches = control_mismatches(baseline["controls"], candidate["controls"])
    if prompting is not None:
        # the prompting baseline runs the base alone, so its engine need not have LoRA enabled
        keys = tuple(k for k in CONTROL_KEYS if k != "lora_enabled")
        mismatches += [f"prompting baseline {m}" for m in control_mismatches(candidate["controls"],
                                                                             prompting["controls"], keys)]
    if mismatches and not allow_uncontrolled:
        raise UncontrolledComparison(mismatches)
    base_tests = {t["id"]: t for t in baseline["tests"]}
    cand_tests = {t["id"]: t for t in candidate["tests"]}
    common = [i for i in cand_tests if i in base_tests]
    flips = _flips(base_tests, cand_tests, common)
    identical = sum(1 for i in common if base_tests[i].get("output") == cand_tests[i].get("output"))
    paired = paired_blocks(baseline, candidate)
    by_block = {p["block"]: p for p in paired}
    deltas = {p["block"]: p["difference"] for p in paired}
    c_blocks = candidate["blocks"]
    reasons, ok = [f"{'default gates (none given)' if default_gates else 'gates'}: {gates.describe()}"], True
    target = by_block.get("target")
    if target is None:
        ok = False
        why = (c_blocks.get("target") or {}).get("errored_reason")
        reasons.append("target block not measured" + (f" ({why})" if why else "") + ": no verdict can pass")
    else:
        rate = c_blocks["target"]["pass_rate"]
        if gates.min_target_pass_rate:
            good = rate >= gates.min_target_pass_rate
            ok &= good
            reasons.append(f"target pass rate {rate:.1%} {'≥' if good else '<'} gate "
                           f"{gates.min_target_pass_rate:.1%}")
        gain = (f"target {target['difference']:+.1%} (95% CI {target['ci_low']:+.1%} .. {target['ci_high']:+.1%}; "
                f"gained {target['gained']}, lost {target['lost']} of {target['pairs']}; McNemar "
                f"p={target['mcnemar_p']:.2g})")
        if gates.require_target_gain:
            good = target["ci_low"] > 0
            ok &= good
            reasons.append(gain + (": a gain beyond the noise" if good else ": not a gain beyond the noise"))
        else:
            reasons.append(gain)
    for blk, gate in (("general", gates.max_general_drop_points), ("tool_calling", gates.max_tool_calling_drop_points)):
        p = by_block.get(blk)
        if p is None:
            why = (c_blocks.get(blk) or {}).get("errored_reason")
            reasons.append(f"{blk} block not measured on both sides" + (f" ({why})" if why else ""))
            continue
        good = p["forgetting_points"] <= gate + 1e-9
        ok &= good
        lost = _lost_text(p)
        reasons.append(f"{blk} forgetting {p['forgetting_points']:.1f} points ({p['lost']} of {p['pairs']} lost, "
                       f"{p['gained']} gained) {'≤' if good else '>'} gate {gate:g}{lost}")
    if paired and all(p["difference"] <= 0 for p in paired) and any(p["difference"] < 0 for p in paired):
        ok = False
        reasons.append("worse on every block measured, or no better (" + ", ".join(
            f"{p['block']} {p['difference']:+.1%}" for p in paired) + "): never a PASS")
    no_effect = bool(common) and identical == len(common)
    if no_effect:
        ok = False
        reasons.append(f"adapter had no effect: all {len(common)} outputs identical to the baseline's")
    beats, prompt_stats = None, {}
    if prompting is not None:
        beats, prompt_stats, line = _vs_prompting(candidate, prompting)
        if line:
            reasons.append(line)
    harness = lm_eval_deltas(baseline, candidate)
    for d in harness:
        reasons.append(f"lm-eval {d['task']} {d['metric']}: {d['baseline']:.3f} → {d['candidate']:.3f} "
                       f"({d['delta']:+.3f}, 95% CI {d['ci_low']:+.3f} .. {d['ci_high']:+.3f})"
                       + (": worse beyond the noise" if d["worse"] else ""))
    if mismatches:
        reasons.append("UNCONTROLLED: " + "; ".join(mismatches))
    return Comparison(mismatches, bool(mismatches), flips, deltas, "pass" if ok else "fail", reasons, beats,
                      prompt_stats, no_effect, identical, len(common), harness, paired, default_gates)
