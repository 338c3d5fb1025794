"""promptfoo suites, checked by the control plane before anything is queued (stdlib + PyYAML: no Node, no model).

- `load_user_suite(text, source)`: a user's promptfooconfig.yaml (malformed YAML with its line and column, unknown
  or unsupported assertion types, zero tests, shapes that cannot run here), normalised for the eval job.
- `load_tool_calling_suite()`: the built-in tool-calling suite (suites/tool_calling.yaml) as cases.
- `check_assertions(asserts, where)`: the assertion types and shapes promptfoo 0.123.1 runs here.

Assertions (ALLOWED_ASSERTIONS, each also as `not-<type>`): deterministic string/JSON/XML checks, `javascript`
(inline, run by promptfoo in Node), `python` (inline, run with this interpreter; offline), `levenshtein`,
`rouge-n`, `bleu`, `latency`, `finish-reason`, `is-valid-openai-tools-call`, and `llm-rubric`, graded by the served
model itself (the only model there is offline; self-grading is lenient, so read it as a weak signal) unless a
`grader` provider is given. `similar` needs an embeddings model (promptfoo's default is OpenAI's API) and is
refused, as are the other model-graded and remote types (REFUSED_ASSERTIONS says why, and what to use instead).

A one-line `javascript` value is an expression (promptfoo prepends `return`); a function body (statements with
`return`) must span several lines. A one-line value with a top-level `return` is refused here, as promptfoo would
only report a SyntaxError per test. Running a suite is services.evaluation.promptfoo_run.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from services.core.errors import InvalidArgument, yaml_error
from services.evaluation.cases import Case

SUITES_DIR = Path(__file__).resolve().parent / "suites"
TOOL_CALLING_SUITE = SUITES_DIR / "tool_calling.yaml"

ALLOWED_ASSERTIONS: tuple[str, ...] = (
    "equals", "contains", "icontains", "contains-any", "contains-all", "icontains-any", "icontains-all",
    "starts-with", "regex", "is-json", "contains-json", "is-xml", "contains-xml",
    "javascript", "python", "levenshtein", "rouge-n", "bleu", "latency", "finish-reason",
    "is-valid-openai-tools-call", "llm-rubric",
)
_GRADED = ("answer-relevance", "context-faithfulness", "context-recall", "context-relevance",
           "conversation-relevance", "factuality", "model-graded-factuality", "model-graded-closedqa", "g-eval",
           "agent-rubric", "search-rubric", "select-best", "max-score", "trajectory:goal-success")
REFUSED_ASSERTIONS: dict[str, str] = {
    "similar": "needs an embeddings model (promptfoo's default is OpenAI's API); evaluations run offline against "
               "the served chat model only. Use rouge-n or levenshtein (lexical, offline) or llm-rubric instead",
    **{t: "is model-graded; of those only llm-rubric is supported (graded by the served model)" for t in _GRADED},
    "moderation": "calls a remote moderation API; evaluations run offline",
    "guardrails": "needs a provider with guardrails; evaluations run offline",
    "classifier": "needs a HuggingFace classifier model; evaluations run offline",
    "pi": "calls Pi Labs' remote scorer; evaluations run offline",
    "meteor": "needs the `natural` package, which the pinned install omits",
    "ruby": "needs Ruby, which the evaluation image does not have; use javascript or python",
    "cost": "a locally served model has no price",
    "perplexity": "needs token logprobs, which the openai:chat provider is not asked for here",
    "perplexity-score": "needs token logprobs, which the openai:chat provider is not asked for here",
    "is-valid-function-call": "is for legacy function calling; use is-valid-openai-tools-call",
    "is-valid-openai-function-call": "is for legacy function calling; use is-valid-openai-tools-call",
}

# Top-level keys of a user suite: kept, replaced by ours, or refused (with why).
_SUITE_KEYS = {"description", "prompts", "providers", "targets", "tests", "defaultTest", "evaluateOptions",
               "sharing", "outputPath", "writeLatestResults", "derivedMetrics", "tags", "metadata",
               "commandLineOptions"}
_SUITE_REFUSED = {
    "scenarios": "scenarios are not supported; list the tests under `tests:`",
    "redteam": "red-team configs are not evaluations of the served model; use `promptfoo redteam` yourself",
    "extensions": "extension hooks run files the suite cannot ship; remove them",
    "env": "the suite cannot set the evaluation's environment; remove `env:`",
    "nunjucksFilters": "custom nunjucks filters are loaded from files the suite cannot ship",
    "tracing": "tracing is not supported",
}
_TEST_KEYS = {"description", "vars", "assert", "options", "metadata", "threshold", "prompts", "providers"}
_TEST_REFUSED = {
    "provider": "a per-test provider would answer with another model; the suite runs against the served model",
    "providerOutput": "a fixed provider output skips the served model",
    "assertScoringFunction": "scoring functions are loaded from files the suite cannot ship",
}
# Provider config keys that belong to the suite's tests rather than to the model (kept when providers are replaced).
PROVIDER_KEPT = ("tools", "tool_choice", "response_format", "stop", "functions", "function_call")


# ------------------------------------------------------------------------------------------------ assertion checks
def _ident(ch: str) -> bool:
    return bool(ch) and (ch.isalnum() or ch in "_$")


def _top_level_return(code: str) -> bool:
    """Whether one-line JS has a `return` outside any bracket (promptfoo would make it `return return ...`)."""
    depth, quote, i = 0, "", 0
    while i < len(code):
        c = code[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "'\"`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and code.startswith("return", i) and not _ident(code[i - 1:i]) \
                and not _ident(code[i + 6:i + 7]):
            return True
        i += 1
    return False


def check_assertions(asserts: Any, where: str) -> None:
    if asserts is None:
        return
    if not isinstance(asserts, list):
        raise InvalidArgument.field(f"{where}.assert", "must be a list of assertions ({type: ..., value: ...})")
    for j, a in enumerate(asserts):
        here = f"{where}.assert[{j}]"
        if not isinstance(a, Mapping) or not isinstance(a.get("type"), str) or not a["type"]:
            raise InvalidArgument.field(here, "must be a mapping with a string `type`")
        t = a["type"]
        if t == "assert-set":
            check_assertions(a.get("assert"), here)
            continue
        base = t.removeprefix("not-")
        if base in REFUSED_ASSERTIONS:
            raise InvalidArgument.field(here, f"assertion type {t!r} is not supported: {REFUSED_ASSERTIONS[base]}")
        if base not in ALLOWED_ASSERTIONS:
            raise InvalidArgument.field(
                here, f"unknown assertion type {t!r}; supported: {', '.join(ALLOWED_ASSERTIONS)} "
                      "(each also as not-<type>), and assert-set")
        value = a.get("value")
        if isinstance(value, str) and value.startswith("file://"):
            raise InvalidArgument.field(f"{here}.value", "file:// references are not supported (the suite is one "
                                                         "file); inline the value")
        if base in ("javascript", "python") and not isinstance(value, str):
            raise InvalidArgument.field(f"{here}.value", f"a {base} assertion needs its code as a string")
        if base == "javascript" and "\n" not in value.rstrip() and _top_level_return(value.strip()):
            raise InvalidArgument.field(
                f"{here}.value", "one-line javascript is an expression in promptfoo (it prepends `return`); write "
                                 "a function body with `return` on several lines, or drop the `return`")


def _no_file_refs(value: Any, where: str) -> None:
    if isinstance(value, str) and value.startswith("file://"):
        raise InvalidArgument.field(where, "file:// references are not supported (the suite is one file); inline it")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _no_file_refs(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_file_refs(v, f"{where}[{i}]")


# ------------------------------------------------------------------------------------------------------- user suite
def _prompt(p: Any, i: int, source: str) -> dict[str, Any]:
    where = f"{source}: prompts[{i}]"
    if isinstance(p, str):
        if p.startswith("file://") or re.match(r"^(exec|python|js|package):", p):
            raise InvalidArgument.field(where, f"{p.split(':', 1)[0]}: prompts are not supported (the suite is one "
                                               "file); inline the prompt text or chat JSON")
        if not p.strip():
            raise InvalidArgument.field(where, "is empty")
        return {"raw": p, "label": p}  # promptfoo labels a string prompt with its text
    if isinstance(p, list):  # a chat prompt written as YAML messages
        if not p or not all(isinstance(m, Mapping) and "role" in m for m in p):
            raise InvalidArgument.field(where, "a list prompt must be chat messages ({role, content})")
        raw = json.dumps(p, ensure_ascii=False)
        return {"raw": raw, "label": raw}
    if isinstance(p, Mapping):
        extra = sorted(set(p) - {"raw", "label", "id", "config"})
        if extra:
            raise InvalidArgument.field(where, f"unsupported prompt keys {extra}; a prompt is a string (with "
                                               "{{vars}}, or chat JSON) or {raw, label, id, config}")
        raw = p.get("raw")
        if isinstance(raw, list):
            raw = json.dumps(raw, ensure_ascii=False)
        if not isinstance(raw, str) or not raw.strip():
            raise InvalidArgument.field(where, "needs `raw`: the prompt text (with {{vars}}) or chat JSON")
        if raw.startswith("file://"):
            raise InvalidArgument.field(where, "file:// prompts are not supported (the suite is one file)")
        out = {"raw": raw, "label": str(p.get("label") or p.get("id") or f"prompt-{i}")}
        if p.get("id"):
            out["id"] = str(p["id"])
        if p.get("config") is not None:
            if not isinstance(p["config"], Mapping):
                raise InvalidArgument.field(f"{where}.config", "must be a mapping")
            out["config"] = dict(p["config"])
        return out
    raise InvalidArgument.field(where, f"a prompt is a string, a list of chat messages or a mapping, not "
                                       f"{type(p).__name__}")


def _test(t: Any, where: str) -> dict[str, Any]:
    if isinstance(t, str):
        raise InvalidArgument.field(where, "tests loaded from files are not supported (the suite is one file); "
                                           "inline the test")
    if not isinstance(t, Mapping):
        raise InvalidArgument.field(where, f"a test is a mapping (vars, assert, ...), not {type(t).__name__}")
    for k in t:
        if k in _TEST_REFUSED:
            raise InvalidArgument.field(f"{where}.{k}", _TEST_REFUSED[k])
        if k not in _TEST_KEYS:
            raise InvalidArgument.field(f"{where}.{k}", f"unsupported test key; supported: "
                                                        f"{', '.join(sorted(_TEST_KEYS))}")
    if t.get("vars") is not None and not isinstance(t["vars"], Mapping):
        raise InvalidArgument.field(f"{where}.vars", "must be a mapping of variable names to values")
    _no_file_refs(t.get("vars"), f"{where}.vars")
    if t.get("options") is not None and not isinstance(t["options"], Mapping):
        raise InvalidArgument.field(f"{where}.options", "must be a mapping")
    _no_file_refs({k: v for k, v in (t.get("options") or {}).items() if k != "provider"}, f"{where}.options")
    if t.get("metadata") is not None and not isinstance(t["metadata"], Mapping):
        raise InvalidArgument.field(f"{where}.metadata", "must be a mapping")
    check_assertions(t.get("assert"), where)
    return copy.deepcopy(dict(t))


def load_user_suite(text: str, source: str) -> dict[str, Any]:
    """Parse and check a user's promptfooconfig.yaml. Returns the normalised suite: description, prompts (each
    {raw, label[, id, config]}), tests, defaultTest, provider_options (tools & co. from its provider, kept when
    the provider is replaced by the served model), source and notes (what was dropped or replaced).

    Raises InvalidArgument naming the line/column, test index, assertion type or key at fault."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None
    if not isinstance(doc, Mapping):
        raise InvalidArgument(f"{source}: a promptfoo config is a YAML mapping (prompts, providers, tests, ...), "
                              f"not {type(doc).__name__ if doc is not None else 'an empty document'}")
    for k in doc:
        if k in _SUITE_REFUSED:
            raise InvalidArgument.field(f"{source}: {k}", _SUITE_REFUSED[k])
        if k not in _SUITE_KEYS:
            raise InvalidArgument.field(f"{source}: {k}", f"unsupported top-level key; supported: "
                                                          f"{', '.join(sorted(_SUITE_KEYS))}")
    notes: list[str] = []

    prompts = doc.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Mapping):
        raise InvalidArgument.field(f"{source}: prompts", "a mapping of prompt files to labels is not supported "
                                                          "(the suite is one file); list the prompts inline")
    if not prompts:
        raise InvalidArgument.field(f"{source}: prompts", "the suite has no prompts; add at least one under "
                                                          "`prompts:` (text with {{vars}}, or chat JSON)")
    if not isinstance(prompts, list):
        raise InvalidArgument.field(f"{source}: prompts", "must be a list")
    norm_prompts = [_prompt(p, i, source) for i, p in enumerate(prompts)]
    labels = [p["label"] for p in norm_prompts]
    if len(set(labels)) != len(labels):
        raise InvalidArgument.field(f"{source}: prompts", f"prompt labels must be unique: {labels}")

    default = doc.get("defaultTest")
    if default is not None:
        if isinstance(default, str):
            raise InvalidArgument.field(f"{source}: defaultTest", "a defaultTest loaded from a file is not supported")
        default = _test(default, f"{source}: defaultTest")

    tests = doc.get("tests")
    if isinstance(tests, str):
        raise InvalidArgument.field(f"{source}: tests", "tests loaded from files are not supported (the suite is "
                                                        "one file); list them inline")
    if tests is not None and not isinstance(tests, list):
        raise InvalidArgument.field(f"{source}: tests", "must be a list of tests")
    if not tests:
        raise InvalidArgument.field(f"{source}: tests", "the suite has zero tests; add at least one under `tests:` "
                                                        "(vars and assert)")
    norm_tests = [_test(t, f"{source}: tests[{i}]") for i, t in enumerate(tests)]
    for i, t in enumerate(norm_tests):
        if t.get("providers") is not None:
            del t["providers"]
            notes.append(f"tests[{i}].providers dropped: every test runs against the served model")
        if isinstance(t.get("prompts"), list):
            unknown = [r for r in t["prompts"] if not any(
                r in (p["label"], p.get("id")) or (str(r).endswith("*") and p["label"].startswith(str(r)[:-1]))
                for p in norm_prompts)]
            if unknown:
                raise InvalidArgument.field(f"{source}: tests[{i}].prompts", f"names no prompt of the suite: {unknown}")

    providers = doc.get("providers", doc.get("targets"))
    kept: dict[str, Any] = {}
    if providers is not None:
        plist = providers if isinstance(providers, list) else [providers]
        found = []
        for p in plist:
            cfg = p.get("config") if isinstance(p, Mapping) else None
            if isinstance(cfg, Mapping):
                found.append({k: cfg[k] for k in PROVIDER_KEPT if k in cfg})
            else:
                found.append({})
        distinct = {json.dumps(f, sort_keys=True) for f in found}
        if len(distinct) > 1:
            raise InvalidArgument.field(f"{source}: providers", f"the suite runs against the served model only, and "
                                                                f"its {len(plist)} providers set different "
                                                                f"{'/'.join(PROVIDER_KEPT)}; keep one provider")
        kept = found[0] if found else {}
        _no_file_refs(kept, f"{source}: providers.config")
        notes.append(f"providers replaced by the served model ({len(plist)} given"
                     + (f"; kept their {', '.join(sorted(kept))}" if kept else "") + ")")
    for k in ("evaluateOptions", "outputPath", "commandLineOptions", "writeLatestResults"):
        if k in doc:
            notes.append(f"{k} ignored: the evaluation runs one request at a time and keeps its own output")
    for where, t in [("defaultTest", default)] + [(f"tests[{i}]", t) for i, t in enumerate(norm_tests)]:
        if t and isinstance(t.get("options"), Mapping) and "provider" in t["options"]:
            notes.append(f"{where}.options.provider replaced: llm-rubric is graded by the served model")
    return {"description": str(doc.get("description") or ""), "prompts": norm_prompts, "tests": norm_tests,
            "defaultTest": default, "provider_options": kept, "derivedMetrics": doc.get("derivedMetrics"),
            "source": source, "notes": notes}


# --------------------------------------------------------------------------------------------- built-in tool suite
def _tool_check_js(expect_tool: str | None, expect_args: Mapping[str, Any]) -> str:
    """A javascript assertion (function body) on the openai:chat output: no call when none is expected, else
    exactly one call, to the expected tool, with the expected argument values (strings: case-insensitive
    substring; numbers: equal within 1e-6; others: equal as JSON)."""
    head = ("const calls = Array.isArray(output) ? output\n"
            "  : (output && typeof output === 'object' && Array.isArray(output.tool_calls) ? output.tool_calls : []);\n"
            "const names = calls.map(c => (c && c.function && c.function.name) || '?');\n")
    if expect_tool is None:
        js = head + ("if (calls.length === 0) return {pass: true, score: 1, reason: 'no tool call, as expected'};\n"
                     "return {pass: false, score: 0, reason: 'expected no tool call, got ' + JSON.stringify(names)};")
    else:
        js = head + (
            f"const want = {json.dumps(expect_tool)};\n"
            f"const expected = {json.dumps(dict(expect_args), ensure_ascii=False)};\n"
            "if (calls.length === 0) return {pass: false, score: 0, reason: 'no tool call; expected ' + want};\n"
            "if (calls.length !== 1 || names[0] !== want) return {pass: false, score: 0,\n"
            "  reason: 'expected one call to ' + want + ', got ' + JSON.stringify(names)};\n"
            "let args;\n"
            "try { args = JSON.parse(calls[0].function.arguments || '') } catch (e) {\n"
            "  return {pass: false, score: 0,\n"
            "          reason: want + ' arguments are not JSON: ' + calls[0].function.arguments};\n"
            "}\n"
            "const same = (a, b) => typeof b === 'string'\n"
            "  ? typeof a === 'string' && a.toLowerCase().includes(b.toLowerCase())\n"
            "  : typeof b === 'number' ? typeof a === 'number' && Math.abs(a - b) < 1e-6\n"
            "  : JSON.stringify(a) === JSON.stringify(b);\n"
            "const wrong = Object.keys(expected).filter(k => !same(args[k], expected[k]));\n"
            "if (wrong.length) return {pass: false, score: 0, reason: want + ' called with ' + JSON.stringify(args)\n"
            "  + '; expected ' + JSON.stringify(expected)};\n"
            "return {pass: true, score: 1, reason: 'called ' + want + ' with ' + JSON.stringify(args)};")
    # promptfoo renders assertion values with nunjucks first: no template syntax may appear in the code
    if re.search(r"\{[{%#]", js):
        raise ValueError(f"expected arguments {dict(expect_args)} hold nunjucks syntax ({{{{, {{% or {{#)")
    return js


def load_tool_calling_suite(path: Path | None = None) -> list[Case]:
    """The built-in tool-calling suite (suites/tool_calling.yaml) as cases: each case offers its tools and checks
    (1) the right tool and argument values, or no call at all (javascript on the tool_calls output), and
    (2) for expected calls, that every call's arguments are valid against the tool's JSON schema
    (is-valid-openai-tools-call, ajv)."""
    path = path or TOOL_CALLING_SUITE
    source = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None
    tools = doc.get("tools") or {}
    system = doc.get("system")
    cases = []
    for i, c in enumerate(doc.get("cases") or []):
        where = f"{source}: cases[{i}]"
        names = c.get("tools") or list(tools)
        unknown = [n for n in names if n not in tools]
        if unknown:
            raise InvalidArgument.field(f"{where}.tools", f"unknown tools {unknown}; the suite defines {list(tools)}")
        expect = c.get("expect") or {}
        want = expect.get("tool")
        if want is not None and want not in names:
            raise InvalidArgument.field(f"{where}.expect.tool", f"{want!r} is not offered in this case ({names})")
        defs = [{"type": "function", "function": {"name": n, **tools[n]}} for n in names]
        check = _tool_check_js(want, expect.get("arguments") or {})
        asserts: list[dict[str, Any]] = [{"type": "javascript", "value": check}]
        if want is not None:
            asserts.append({"type": "is-valid-openai-tools-call"})
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": c["prompt"]}]
        cases.append(Case(id=f"tool-{c['id']}", block="tool_calling", messages=messages, assertions=asserts,
                          tools=defs, tool_choice=c.get("tool_choice", "auto"),
                          metadata={"expected_tool": want, "expected_arguments": expect.get("arguments") or {}}))
    if not cases:
        raise InvalidArgument(f"{source}: the suite has no cases")
    return cases
