"""Scoring and comparison of eval reports: pure Python, no engine, no grpc.

A report (report.json) holds per-test results, per-block pass rates with 95% Wilson intervals, and the run's
*controls*: everything that must be equal for two runs to be compared with the adapter (or the quantization, or
the prompt) as the only difference.
"""

from __future__ import annotations

import math
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


def summarize(tests: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-block passed/total/pass_rate/ci_low/ci_high."""
    out: dict[str, dict[str, float]] = {}
    for block in BLOCKS:
        rows = [t for t in tests if t["block"] == block]
        if not rows:
            continue
        passed = sum(1 for t in rows if t["passed"])
        low, high = wilson(passed, len(rows))
        out[block] = {"passed": passed, "total": len(rows), "pass_rate": passed / len(rows), "ci_low": low,
                      "ci_high": high}
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
    min_target_pass_rate: float = 0.0
    max_general_drop_points: float = 100.0
    max_tool_calling_drop_points: float = 100.0


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _task_counts(report: dict[str, Any], task: str) -> tuple[int, int]:
    rows = [t for t in report.get("tests") or [] if t["id"].startswith(f"lm-eval/{task}/")]
    return sum(1 for t in rows if t["passed"]), len(rows)


def lm_eval_deltas(baseline: dict[str, Any], candidate: dict[str, Any], z: float = 1.96) -> list[dict[str, Any]]:
    """Per lm-eval task both reports ran: the primary metric, candidate minus baseline, with a 95% interval.
    Where the metric is a pass rate over the task's documents (each a test: acc, exact_match), Newcombe's interval
    of the two rates (sound at 0 and 1, where standard errors vanish); otherwise a normal interval from lm-eval's
    two standard errors (as if independent: conservative for the same documents), and without them the point
    itself. `worse`: the interval lies wholly on the bad side (by the metric's higher_is_better)."""
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
        se_b, se_c = b.get("primary_stderr"), c.get("primary_stderr")
        if nc and nb and abs(pc / nc - float(c["value"])) < 1e-9 and abs(pb / nb - float(b["value"])) < 1e-9:
            d, low, high = newcombe_difference(pc, nc, pb, nb, z)
            known = True
        else:
            known = isinstance(se_b, (int, float)) and isinstance(se_c, (int, float))
            half = z * math.sqrt(se_b ** 2 + se_c ** 2) if known else 0.0
            low, high = d - half, d + half
        worse = known and (high < 0 if higher else low > 0)
        out.append({"task": name, "metric": str(c["primary"]), "baseline": float(b["value"]),
                    "candidate": float(c["value"]), "delta": d, "ci_low": low, "ci_high": high, "worse": worse})
    return out


class UncontrolledComparison(Exception):
    def __init__(self, mismatches: list[str]):
        super().__init__("; ".join(mismatches))
        self.mismatches = mismatches


def compare(baseline: dict[str, Any], candidate: dict[str, Any], *, gates: Gates | None = None,
            prompting: dict[str, Any] | None = None, allow_uncontrolled: bool = False) -> Comparison:
    """Baseline vs candidate (and, optionally, the prompting baseline). Raises UncontrolledComparison when the
    controls differ, unless allowed (then the comparison is stamped uncontrolled)."""
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
    flips = [{"test_id": i, "block": cand_tests[i]["block"], "now_passes": bool(cand_tests[i]["passed"])}
             for i in common if bool(base_tests[i]["passed"]) != bool(cand_tests[i]["passed"])]
    identical = sum(1 for i in common if base_tests[i].get("output") == cand_tests[i].get("output"))
    b_blocks, c_blocks = baseline["blocks"], candidate["blocks"]
    deltas = {blk: c_blocks[blk]["pass_rate"] - b_blocks[blk]["pass_rate"]
              for blk in BLOCKS if blk in b_blocks and blk in c_blocks}
    reasons, ok = [], True
    if "target" in c_blocks:
        rate = c_blocks["target"]["pass_rate"]
        good = rate >= gates.min_target_pass_rate
        ok &= good
        reasons.append(f"target pass rate {rate:.1%} {'≥' if good else '<'} gate {gates.min_target_pass_rate:.1%}")
    else:
        reasons.append("target block not measured")
    for blk, gate in (("general", gates.max_general_drop_points), ("tool_calling", gates.max_tool_calling_drop_points)):
        if blk not in deltas:
            reasons.append(f"{blk} block not measured on both sides")
            continue
        drop = -deltas[blk] * 100
        good = drop <= gate + 1e-9
        ok &= good
        reasons.append(f"{blk} drop {drop:+.1f} points {'≤' if good else '>'} gate {gate:g}")
    no_effect = bool(common) and identical == len(common)
    if no_effect:
        ok = False
        reasons.append(f"adapter had no effect: all {len(common)} outputs identical to the baseline's")
    beats, prompt_stats = None, {}
    if prompting is not None and "target" in prompting["blocks"] and "target" in c_blocks:
        c, p = c_blocks["target"], prompting["blocks"]["target"]
        d, low, high = newcombe_difference(int(c["passed"]), int(c["total"]), int(p["passed"]), int(p["total"]))
        beats = low > 0
        prompt_stats = {"prompted_pass_rate": p["pass_rate"], "difference": d, "ci_low": low, "ci_high": high}
        reasons.append(f"vs prompting baseline: {d:+.1%} (95% CI {low:+.1%} .. {high:+.1%}): "
                       + ("the adapter beats base + prompt + few-shot" if beats else
                          "not more than the noise; would a good prompt have been enough?"))
    harness = lm_eval_deltas(baseline, candidate)
    for d in harness:
        reasons.append(f"lm-eval {d['task']} {d['metric']}: {d['baseline']:.3f} → {d['candidate']:.3f} "
                       f"({d['delta']:+.3f}, 95% CI {d['ci_low']:+.3f} .. {d['ci_high']:+.3f})"
                       + (": worse beyond the noise" if d["worse"] else ""))
    if mismatches:
        reasons.append("UNCONTROLLED: " + "; ".join(mismatches))
    return Comparison(mismatches, bool(mismatches), flips, deltas, "pass" if ok else "fail", reasons, beats,
                      prompt_stats, no_effect, identical, len(common), harness)
