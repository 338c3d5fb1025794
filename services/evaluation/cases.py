"""The test cases of an eval run, block by block, from what the spec names. Pure Python (no engine).

- target: the held-out split of a prepared dataset (the prompt is the conversation up to the last assistant
  turn, the expected answer that turn, checked by the spec's assertion type), plus the user's own promptfoo suite;
- general: fact probes (question -> short answer), scored by knowledge: the answer (or an alias) appears as a
  whole word or phrase after normalising case, punctuation and whitespace; exact match is kept as a second figure;
- tool_calling: the built-in suite (services/evaluation/suites/tool_calling.yaml).

The prompting baseline wraps every case's messages with the system prompt and k few-shot examples from a
training split; the suite's hash is taken before wrapping, so the prompted run stays comparable.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.evaluation.scoring import BLOCKS

@dataclass
class Case:
    """One test: `messages` (OpenAI chat messages) sent to the served model, checked by `assertions`
    (promptfoo assertion dicts); `tools`/`tool_choice` go with this request only."""

    id: str
    block: str  # "target" | "general" | "tool_calling"
    messages: list[dict[str, Any]]
    assertions: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Case.id is empty")
        if self.block not in BLOCKS:
            raise ValueError(f"Case {self.id}: block must be one of {', '.join(BLOCKS)}, not {self.block!r}")
        if not self.messages or not all(isinstance(m, Mapping) and "role" in m for m in self.messages):
            raise ValueError(f"Case {self.id}: messages must be a non-empty list of {{role, content}} dicts")


# Exact match after trimming, lower-casing and dropping end punctuation: the foundation fixture's accuracy rule.
NORMALISED_EQUALS = ("const norm = s => String(s).trim().toLowerCase().replace(/[.!?]+$/, '').trim();\n"
                     "return norm(output) === norm({expected});")
# Knowledge: one of the answers appears in the output as a whole word or phrase, after lower-casing, turning every
# run of punctuation and whitespace into one space (Unicode-aware, as `words` below). "20, my friend." knows "20";
# "200" does not; "Februart" does not know "February".
KNOWS = ("const norm = s => ' ' + String(s).toLowerCase().normalize('NFKC').replace(/[^\\p{{L}}\\p{{N}}]+/gu, ' ')"
         ".trim() + ' ';\nconst out = norm(output);\nconst answers = {answers};\n"
         "return answers.some(a => norm(a).trim() !== '' && out.includes(norm(a)));")


def words(text: str) -> str:
    """KNOWS' normal form in Python: lower-cased, NFKC, every run of non-letters/digits one space, padded."""
    import unicodedata

    t = unicodedata.normalize("NFKC", str(text).lower())
    return " " + " ".join("".join(ch if ch.isalnum() else " " for ch in t).split()) + " "


def knows(output: str, answers: list[str]) -> bool:
    """Python twin of KNOWS (the tests hold the two to the same answers)."""
    out = words(output)
    return any(words(a).strip() and words(a) in out for a in answers)


def exact_match(output: str, expected: str) -> bool:
    """Python twin of NORMALISED_EQUALS: the second, stricter figure of fact probes."""
    def norm(s: str) -> str:
        return re.sub(r"[.!?]+$", "", str(s).strip().lower()).strip()
    return norm(output) == norm(expected)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _clean(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def expectation(kind: str, expected: str) -> list[dict[str, Any]]:
    """promptfoo assertions for a held-out answer."""
    if kind == "exact":
        return [{"type": "javascript", "value": NORMALISED_EQUALS.format(expected=json.dumps(expected))}]
    if kind == "contains":
        return [{"type": "icontains", "value": expected.strip()}]
    if kind == "regex":
        return [{"type": "regex", "value": re.escape(expected.strip())}]
    if kind == "json_schema":
        try:
            parsed = json.loads(expected)
        except json.JSONDecodeError:
            return [{"type": "is-json"}]
        if isinstance(parsed, dict):
            return [{"type": "is-json", "value": {"type": "object", "required": sorted(parsed)}}]
        return [{"type": "is-json"}]
    if kind == "json_fields":
        # the reply is JSON and every field of the reference object has its value (ajv: const per property)
        try:
            parsed = json.loads(expected)
        except json.JSONDecodeError:
            raise ValueError(f"json_fields needs reference answers that are JSON objects; got {expected[:60]!r}")
        if not isinstance(parsed, dict):
            return [{"type": "is-json", "value": {"const": parsed}}]
        return [{"type": "is-json", "value": {"type": "object", "required": sorted(parsed),
                                              "properties": {k: {"const": v} for k, v in parsed.items()}}}]
    if kind == "similarity":  # offline: no embeddings model, so ROUGE-N overlap stands in for similarity
        return [{"type": "rouge-n", "value": expected, "threshold": 0.5}]
    if kind == "rubric":
        return [{"type": "llm-rubric", "value": f"The answer says the same as: {expected}"}]
    raise ValueError(f"unknown held-out assertion {kind!r}")


def heldout_cases(holdout: Path, assertion: str, limit: int = 0) -> list[Case]:
    cases = []
    for row in read_jsonl(holdout):
        messages = _clean(row["messages"])
        pref = row.get("preference") or {}
        if pref.get("chosen"):
            messages += _clean(pref["chosen"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last <= 0 or not messages[last].get("content"):
            continue  # nothing to check against (tool-call-only answers are the tool block's business)
        cases.append(Case(id=f"target-{row['id']}", block="target", messages=messages[:last],
                          assertions=expectation(assertion, messages[last]["content"]),
                          tools=row.get("tools") or None, metadata={"expected": messages[last]["content"]}))
        if limit and len(cases) >= limit:
            break
    return cases


def fact_cases(facts: Path, limit: int = 0) -> list[Case]:
    cases = []
    for row in read_jsonl(facts):
        answers = [str(row["answer"]), *[str(a) for a in row.get("aliases") or []]]
        cases.append(Case(id=f"general-{row['id']}", block="general",
                          messages=[{"role": "user", "content": row["question"]}],
                          assertions=[{"type": "javascript",
                                       "value": KNOWS.format(answers=json.dumps(answers, ensure_ascii=False))}],
                          metadata={"expected": row["answer"], "category": row.get("category", ""),
                                    "exact_check": True}))
        if limit and len(cases) >= limit:
            break
    return cases


def few_shot(train: Path, k: int, seed: int) -> list[dict[str, Any]]:
    """k examples from a training split, as alternating user/assistant turns (seeded)."""
    rows = [r for r in read_jsonl(train) if len(r["messages"]) >= 2]
    rng = random.Random(seed)
    picked = rng.sample(rows, min(k, len(rows)))
    turns: list[dict[str, Any]] = []
    for r in picked:
        turns += [m for m in _clean(r["messages"]) if m["role"] in ("user", "assistant") and m.get("content")][:2]
    return turns


def prompted(cases: list[Case], system_prompt: str, shots: list[dict[str, Any]]) -> list[Case]:
    """The prompting baseline: the same cases behind a system prompt and few-shot turns."""
    out = []
    for c in cases:
        messages = [m for m in c.messages if m["role"] != "system"]
        system = [{"role": "system", "content": system_prompt}] if system_prompt else [
            m for m in c.messages if m["role"] == "system"]
        out.append(Case(id=c.id, block=c.block, messages=system + shots + messages, assertions=c.assertions,
                        tools=c.tools, tool_choice=c.tool_choice, metadata=c.metadata))
    return out


def suite_sha256(cases: list[Case], user_suite_yaml: str = "") -> str:
    body = [{"id": c.id, "block": c.block, "messages": c.messages, "assertions": c.assertions, "tools": c.tools}
            for c in cases]
    return hashlib.sha256((json.dumps(body, sort_keys=True) + user_suite_yaml).encode()).hexdigest()
