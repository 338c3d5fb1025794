"""services.evaluation.promptfoo_suite and promptfoo_run against the REAL promptfoo CLI (infra/promptfoo, `make setup-promptfoo`).

The model is a scripted fake OpenAI-compatible server on 127.0.0.1 (a lookup table from the last user message to
an answer: text, tool calls, or text + tool calls); it records every request, so the tests also check what
promptfoo sent (model, sampling, per-test tools).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from services.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.evaluation import promptfoo_run as pf
from services.evaluation import promptfoo_suite as pfs
from services.evaluation.cases import Case
from tests.fakes import JsonHandler

MODEL = "tiny-served"
SAMPLING = {"temperature": 0.0, "max_tokens": 32, "seed": 7}


def _call(name: str, args: dict | str) -> dict:
    return {"id": f"call-{name}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


# last user message -> the assistant message the fake model answers with
ANSWERS: dict[str, dict] = {
    # the user suite (prompt "Answer briefly: {{question}}")
    "Answer briefly: capital of France?": {"content": "Paris"},
    "Answer briefly: capital of Spain?": {"content": "Madrid is the capital."},
    "Answer briefly: give json": {"content": '{"a": 1, "b": [true]}'},
    "Answer briefly: give broken json": {"content": '{"a": '},
    "Answer briefly: count to three": {"content": "one two three"},
    "Answer briefly: count to four": {"content": "one two"},
    "Answer briefly: shout hello": {"content": "HELLO"},
    "Answer briefly: say thanks": {"content": "Thank you kindly."},
    "Answer briefly: who are you?": {"content": "As an AI language model, I am Paris."},
    # the built-in tool-calling suite
    "What's the weather like in Paris right now?": {
        "content": None, "tool_calls": [_call("get_weather", {"city": "Paris"})]},
    "Is it hot in Tokyo today? Give me the temperature in Fahrenheit.": {
        "content": None, "tool_calls": [_call("get_weather", {"city": "Tokyo", "unit": "kelvin"})]},
    "Do I need an umbrella in London today?": {  # right tool and city, but a property the schema forbids
        "content": None, "tool_calls": [_call("get_weather", {"city": "London", "country": "UK"})]},
    "How much is 100 US dollars in euros?": {
        "content": None, "tool_calls": [_call("convert_currency", {"amount": 100, "from": "USD", "to": "EUR"})]},
    "Convert 25.5 GBP to Japanese yen.": {  # the wrong tool
        "content": None, "tool_calls": [_call("search_docs", {"query": "GBP to JPY"})]},
    "Search the docs for how to reset my password.": {  # text + tool calls: promptfoo's output is the message
        "content": "Let me look that up.", "tool_calls": [_call("search_docs", {"query": "reset password"})]},
    "Where does the documentation explain API key rotation? Look it up.": {"content": "In the security guide."},
    "What is 2 plus 2?": {"content": "4"},
    "Hi! How are you today?": {"content": None, "tool_calls": [_call("get_weather", {"city": "Here"})]},
    "What is the capital of France?": {"content": "Paris."},
    # a general case without tools
    "What is the capital of Italy?": {"content": "Rome"},
    # fact probes scored by knowledge (and exact match beside it)
    "What is 4 times 5?": {"content": "20, my friend."},
    "What is 4 times 50?": {"content": "It is 2000."},
    "What is the second month?": {"content": "Februart, my friend."},
    "How many legs does a spider have?": {"content": "A spider has 8 legs."},
    "What is the capital of India?": {"content": "new  delhi!"},
    "What is 2 times 3?": {"content": "6"},
    # held-out tickets checked field by field (json_fields)
    "Ticket: charged twice": {"content": '{"priority": "high", "category": "billing", "order_id": null}'},
    "Ticket: slow refund": {"content": '{"category": "billing", "priority": "low", "order_id": null}'},
    "Ticket: fenced": {"content": '```json\n{"category": "billing", "priority": "high", "order_id": null}\n```'},
}
GRADER_ANSWER = {"content": '{"reason": "the answer is polite", "pass": true, "score": 1}'}


class FakeModel:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(JsonHandler):
            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    return self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                self.send_json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = self.read_json()
                if self.path.startswith("/hang/"):  # a server that accepts the request and never answers
                    outer.release.wait(30)
                    return
                outer.requests.append({"path": self.path, "body": body})
                text = json.dumps(body["messages"])
                if "TOO LONG" in text:  # vLLM's answer to a prompt over the model's context
                    return self.send_json(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                                "message": "This model's maximum context length is 512 tokens. "
                                                "However, your prompt contains at least 513 input tokens."})
                user = [m for m in body["messages"] if m["role"] == "user"]
                last = user[-1]["content"] if user else ""
                if "rubric" in text.lower():
                    msg = GRADER_ANSWER
                else:
                    msg = ANSWERS.get(last, {"content": f"I don't know: {last}"})
                self.send_json(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", **msg},
                                 "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def body_for(self, user_text: str) -> dict:
        found = [r["body"] for r in self.requests
                 if any(m["role"] == "user" and m["content"] == user_text for m in r["body"]["messages"])]
        assert len(found) == 1, (user_text, len(found))
        return found[0]


@pytest.fixture(scope="module")
def installed() -> Path:
    try:
        return pf.promptfoo_bin()
    except FailedPrecondition as e:
        pytest.fail(f"{e} (make setup-promptfoo)")


@pytest.fixture(scope="module")
def fake():
    f = FakeModel()
    f.thread.start()
    yield f
    f.release.set()
    f.server.shutdown()
    f.server.server_close()


def _home_promptfoo_state() -> dict[str, float]:
    home = Path(os.path.expanduser("~"))
    out = {}
    for p in (home / ".promptfoo", home / ".cache" / "promptfoo", home / ".config" / "promptfoo",
              home / ".local" / "share" / "promptfoo"):
        if p.exists():
            out[str(p)] = max([p.stat().st_mtime] + [q.stat().st_mtime for q in p.rglob("*")])
    return out


@pytest.fixture(scope="module")
def home_guard():
    """Nothing promptfoo writes may land under the real ~ (telemetry id, config, database, logs, cache)."""
    before = _home_promptfoo_state()
    start = time.time()
    yield
    after = _home_promptfoo_state()
    assert after == before, f"promptfoo wrote under ~: {after} (before: {before})"
    home = Path(os.path.expanduser("~"))
    new = [str(p) for p in home.glob("*") if "promptfoo" in p.name.lower() and p.stat().st_mtime >= start]
    assert not new, new


USER_SUITE = """\
description: capitals and formats
prompts:
  - "Answer briefly: {{question}}"
providers:
  - id: openai:gpt-4o-mini           # replaced by the served model
    config: {temperature: 0.9}
defaultTest:
  assert:
    - type: not-icontains
      value: as an ai
tests:
  - description: contains passes
    vars: {question: 'capital of France?'}
    assert: [{type: contains, value: Paris}]
  - description: equals fails
    vars: {question: 'capital of Spain?'}
    assert: [{type: equals, value: Madrid}]
  - description: is-json passes
    vars: {question: 'give json'}
    assert: [{type: is-json}]
  - description: is-json fails
    vars: {question: 'give broken json'}
    assert: [{type: is-json}]
  - description: javascript expression passes
    vars: {question: 'count to three'}
    assert: [{type: javascript, value: "output.split(' ').length === 3"}]
  - description: javascript body fails
    vars: {question: 'count to four'}
    assert:
      - type: javascript
        value: |
          const n = output.split(' ').length;
          return n === 4;
  - description: python passes
    vars: {question: 'shout hello'}
    assert: [{type: python, value: "output.isupper()"}]
  - description: llm-rubric graded by the served model
    vars: {question: 'say thanks'}
    assert:
      - type: llm-rubric
        value: The answer is polite
        provider: openai:gpt-4o      # replaced: the served model grades
  - description: defaultTest assertion fails
    vars: {question: 'who are you?'}
    assert: [{type: contains, value: Paris}]
"""

USER_EXPECTED = {  # description -> passed
    "contains passes": True, "equals fails": False, "is-json passes": True, "is-json fails": False,
    "javascript expression passes": True, "javascript body fails": False, "python passes": True,
    "llm-rubric graded by the served model": True, "defaultTest assertion fails": False,
}


def test_user_suite_runs_as_is_against_the_served_model(installed, fake, home_guard, tmp_path):
    suite = pfs.load_user_suite(USER_SUITE, "promptfooconfig.yaml")
    assert len(suite["tests"]) == 9 and any("providers replaced" in n for n in suite["notes"])
    config = pf.user_suite_config(suite, base_url=fake.base_url, model=MODEL, sampling=SAMPLING)
    n_before = len(fake.requests)
    result = pf.run(config, tmp_path / "user", timeout_s=120)

    assert len(result.results) == 9
    by_desc = {}
    cfg_tests = config["tests"]
    for r in result.results:
        idx = int(r.case_id.rsplit("-", 1)[1])
        by_desc[cfg_tests[idx]["description"]] = r
    assert {d: r.passed for d, r in by_desc.items()} == USER_EXPECTED, {d: r.reason for d, r in by_desc.items()}
    assert all(r.block == "target" and r.error is None for r in result.results)
    assert {r.prompt_label for r in result.results} == {"Answer briefly: {{question}}"}
    assert by_desc["equals fails"].output == "Madrid is the capital."
    assert "Madrid" in by_desc["equals fails"].reason
    assert by_desc["contains passes"].prompt == "Answer briefly: capital of France?"
    assert by_desc["contains passes"].latency_ms is not None
    assert "icontains" in by_desc["defaultTest assertion fails"].reason  # the defaultTest not-icontains failed
    assert result.passed == 5 and result.by_block()["target"]["total"] == 9
    assert result.out_json.is_file() and json.loads(result.out_json.read_text())["results"]["results"]

    # what promptfoo sent: the served model with our sampling (not the suite's provider), and the rubric's
    # grading request went to the served model too
    sent = fake.requests[n_before:]
    assert len(sent) == 10  # 9 tests + 1 grading call
    assert {r["body"]["model"] for r in sent} == {MODEL}
    body = fake.body_for("Answer briefly: capital of France?")
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.0, 32, 7)
    assert "tools" not in body
    assert sum("rubric" in json.dumps(r["body"]).lower() for r in sent) == 1
    # promptfoo's state lives in the workdir
    assert (tmp_path / "user" / ".promptfoo" / "promptfoo.db").exists()


def test_builtin_tool_calling_suite_scores_tool_calls(installed, fake, home_guard, tmp_path):
    cases = pfs.load_tool_calling_suite()
    assert 8 <= len(cases) <= 12 and all(c.block == "tool_calling" and c.tools for c in cases)
    general = Case(id="general-rome", block="general",
                      messages=[{"role": "user", "content": "What is the capital of Italy?"}],
                      assertions=[{"type": "icontains", "value": "rome"}])
    config = pf.build_config(cases + [general], base_url=fake.base_url, model=MODEL, sampling=SAMPLING)
    result = pf.run(config, tmp_path / "tools", timeout_s=120)

    passed = {r.case_id: r.passed for r in result.results}
    assert passed == {
        "tool-weather-paris": True,              # right tool, right and schema-valid arguments
        "tool-weather-tokyo-fahrenheit": False,  # unit "kelvin": not the expected value, not in the schema's enum
        "tool-weather-only-tool": False,         # right tool and city, but "country" is not in the schema
        "tool-currency-usd-eur": True,
        "tool-currency-gbp-jpy": False,          # the wrong tool
        "tool-docs-reset-password": True,        # text + tool call (promptfoo's output is the message object)
        "tool-docs-api-keys": False,             # answered in text where a call was needed
        "tool-no-call-arithmetic": True,
        "tool-no-call-greeting": False,          # a call where none is needed
        "tool-no-call-capital": True,
        "general-rome": True,
    }, {r.case_id: r.reason for r in result.results}
    res = {r.case_id: r for r in result.results}
    assert all(r.error is None for r in result.results)
    assert "additional" in res["tool-weather-only-tool"].reason.lower()  # ajv: additionalProperties
    assert "search_docs" in res["tool-currency-gbp-jpy"].reason
    assert "expected no tool call" in res["tool-no-call-greeting"].reason
    assert isinstance(res["tool-weather-paris"].output, list)
    assert res["tool-weather-paris"].output[0]["function"]["name"] == "get_weather"
    assert {r.block for r in result.results} == {"tool_calling", "general"}
    blocks = result.by_block()
    assert (blocks["tool_calling"]["passed"], blocks["tool_calling"]["total"]) == (5, 10)
    assert blocks["tool_calling"]["low"] < 0.5 < blocks["tool_calling"]["high"]

    # per-test tools: each request carries only its case's tools; the general case none at all
    only = fake.body_for("Do I need an umbrella in London today?")
    assert [t["function"]["name"] for t in only["tools"]] == ["get_weather"] and only["tool_choice"] == "auto"
    every = fake.body_for("What's the weather like in Paris right now?")
    assert [t["function"]["name"] for t in every["tools"]] == ["get_weather", "convert_currency", "search_docs"]
    capital = fake.body_for("What is the capital of France?")
    assert [t["function"]["name"] for t in capital["tools"]] == ["get_weather", "search_docs"]
    plain = fake.body_for("What is the capital of Italy?")
    assert "tools" not in plain and "tool_choice" not in plain
    assert plain["messages"][0] == {"role": "user", "content": "What is the capital of Italy?"}
    assert every["messages"][0]["role"] == "system"


def test_messages_reach_the_model_verbatim(installed, fake, home_guard, tmp_path):
    tricky = 'Quote " backslash \\ braces {{ question }} {% if x %} unicode ünï </s>\nnew line'
    case = Case(id="verbatim", block="target",
                   messages=[{"role": "system", "content": tricky},
                             {"role": "user", "content": "What is the capital of Italy?"},
                             {"role": "assistant", "content": "Rome"},
                             {"role": "user", "content": "What is 2 plus 2?"}],
                   assertions=[{"type": "equals", "value": "4"}])
    result = pf.run(pf.build_config([case], base_url=fake.base_url, model=MODEL, sampling=SAMPLING),
                    tmp_path / "verbatim", timeout_s=120)
    assert [r.passed for r in result.results] == [True]
    assert fake.requests[-1]["body"]["messages"] == case.messages


def test_malformed_yaml_names_line_and_column():
    text = "prompts:\n  - 'hi {{x}}'\ntests:\n  - vars: {x: 1\n    assert: []\n"
    with pytest.raises(InvalidArgument) as e:
        pfs.load_user_suite(text, "suite.yaml")
    assert "suite.yaml" in str(e.value) and "line 5" in str(e.value) and "column" in str(e.value)


def test_unknown_assertion_type_is_named():
    text = ("prompts: ['hi {{x}}']\ntests:\n  - vars: {x: 1}\n    assert: [{type: contains, value: a}]\n"
            "  - vars: {x: 2}\n    assert: [{type: contians, value: a}]\n")
    with pytest.raises(InvalidArgument) as e:
        pfs.load_user_suite(text, "suite.yaml")
    msg = str(e.value)
    assert "tests[1].assert[0]" in msg and "'contians'" in msg and "icontains" in msg and "llm-rubric" in msg


@pytest.mark.parametrize("tests", ["tests: []\n", "", "tests:\n"])
def test_zero_tests_is_refused(tests):
    with pytest.raises(InvalidArgument, match="zero tests"):
        pfs.load_user_suite("prompts: ['hi {{x}}']\n" + tests, "suite.yaml")


@pytest.mark.parametrize("text, words", [
    ("prompts: ['q']\ntests: [{assert: [{type: similar, value: x}]}]\n", ["similar", "embeddings"]),
    ("prompts: ['q']\ntests: [{assert: [{type: not-factuality, value: x}]}]\n", ["not-factuality", "llm-rubric"]),
    ("prompts: ['file://p.txt']\ntests: [{vars: {a: 1}}]\n", ["prompts[0]", "file"]),
    ("prompts: ['q']\ntests: file://tests.csv\n", ["tests", "files"]),
    ("prompts: ['q']\ntests: [{provider: openai:gpt-4o}]\n", ["tests[0].provider", "served model"]),
    ("prompts: ['q']\ntests: [{vars: {doc: 'file://a.txt'}}]\n", ["tests[0].vars.doc", "file://"]),
    ("prompts: ['q']\nscenarios: []\ntests: [{vars: {a: 1}}]\n", ["scenarios"]),
    ("prompts: ['q']\nbogus: 1\ntests: [{vars: {a: 1}}]\n", ["bogus", "supported"]),
    ("prompts: ['q']\ntests: [{assert: [{type: javascript, value: 'const a = 1; return a == 1'}]}]\n",
     ["one-line javascript", "return"]),
    ("tests: [{vars: {a: 1}}]\n", ["no prompts"]),
    ("- a\n- b\n", ["mapping"]),
])
def test_unsupported_shapes_are_refused_precisely(text, words):
    with pytest.raises(InvalidArgument) as e:
        pfs.load_user_suite(text, "s.yaml")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_supported_shapes_load():
    suite = pfs.load_user_suite(
        "prompts:\n"
        "  - 'Q: {{q}}'\n"
        "  - '[{\"role\": \"user\", \"content\": \"{{q}}\"}]'\n"
        "  - [{role: system, content: be brief}, {role: user, content: '{{q}}'}]\n"
        "  - {raw: 'A: {{q}}', label: short}\n"
        "providers: [{id: openai:chat:x, config: {tools: [{type: function, function: {name: f, parameters: {}}}]}}]\n"
        "defaultTest: {assert: [{type: not-contains, value: sorry}], options: {provider: openai:gpt-4o}}\n"
        "tests:\n"
        "  - vars: {q: hi}\n"
        "    prompts: [short]\n"
        "    assert:\n"
        "      - {type: assert-set, assert: [{type: starts-with, value: h}, {type: not-regex, value: '^x'}]}\n"
        "      - {type: contains-json}\n"
        "      - {type: is-valid-openai-tools-call}\n"
        "      - {type: javascript, value: 'output.length > 1 && [1].map(x => { return x }).length === 1'}\n",
        "s.yaml")
    assert [p["label"] for p in suite["prompts"]][::3] == ["Q: {{q}}", "short"]  # promptfoo's labels
    assert json.loads(suite["prompts"][2]["raw"])[0] == {"role": "system", "content": "be brief"}
    assert suite["provider_options"]["tools"][0]["function"]["name"] == "f"
    cfg = pf.user_suite_config(suite, base_url="http://127.0.0.1:1/v1", model="m")
    assert cfg["providers"][0]["id"] == "openai:chat:m" and cfg["providers"][0]["config"]["tools"]
    assert cfg["defaultTest"]["options"]["provider"]["id"] == "openai:chat:m"  # the grader is the served model
    assert "tools" not in cfg["defaultTest"]["options"]["provider"]["config"]
    assert cfg["tests"][0]["metadata"] == {"tunery_case_id": "suite-0", "tunery_block": "target"}


def test_unreachable_base_url_is_a_typed_error_not_a_hang(installed, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    case = Case(id="c", block="general", messages=[{"role": "user", "content": "hi"}],
                   assertions=[{"type": "contains", "value": "hi"}])
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
        pf.run(pf.build_config([case], base_url=f"http://127.0.0.1:{port}/v1", model=MODEL), tmp_path / "u",
               timeout_s=60)
    assert time.monotonic() - t0 < 10


def test_a_server_that_never_answers_is_cut_off_at_the_timeout(installed, fake, tmp_path):
    case = Case(id="c", block="general", messages=[{"role": "user", "content": "hi"}],
                   assertions=[{"type": "contains", "value": "hi"}])
    base = fake.base_url.replace("/v1", "/hang/v1")  # GET /models answers, the chat completion never does
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="did not finish within 8s"):
        pf.run(pf.build_config([case], base_url=base, model=MODEL), tmp_path / "hang", timeout_s=8)
    assert time.monotonic() - t0 < 15


def test_build_config_refuses_what_promptfoo_cannot_run_offline():
    case = Case(id="c", block="target", messages=[{"role": "user", "content": "hi"}],
                   assertions=[{"type": "similar", "value": "hello", "threshold": 0.8}])
    with pytest.raises(InvalidArgument, match="embeddings"):
        pf.build_config([case], base_url="http://127.0.0.1:1/v1", model="m")
    with pytest.raises(ValueError, match="block"):
        Case(id="c", block="other", messages=[{"role": "user", "content": "hi"}])


def test_promptfoo_bin_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNERY_PROMPTFOO_BIN", raising=False)
    monkeypatch.setattr(pf, "PROMPTFOO_DIR", tmp_path / "infra" / "promptfoo")
    monkeypatch.setattr(pf, "ROOT", tmp_path)
    with pytest.raises(FailedPrecondition, match="run infra/scripts/setup-promptfoo.sh"):
        pf.promptfoo_bin()


def test_fact_probes_are_scored_by_knowledge_tickets_by_field_and_errors_kept_apart(installed, fake, home_guard,
                                                                                 tmp_path):
    from services.evaluation import cases as C
    from services.evaluation.scoring import summarize

    facts = [("What is 4 times 5?", "20", []), ("What is 4 times 50?", "200", []),
             ("What is the second month?", "February", []), ("How many legs does a spider have?", "eight", ["8"]),
             ("What is the capital of India?", "New Delhi", []), ("What is 2 times 3?", "6", []),
             ("TOO LONG: what is 1 plus 1?", "2", [])]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"id": f"f{i}", "question": q, "answer": a, "aliases": al}) + "\n"
                            for i, (q, a, al) in enumerate(facts)))
    probes = C.fact_cases(path)
    want = '{"category": "billing", "priority": "high", "order_id": null}'
    tickets = [Case(id=f"target-{k}", block="target", messages=[{"role": "user", "content": f"Ticket: {k}"}],
                    assertions=C.expectation("json_fields", want), metadata={"expected": want})
               for k in ("charged twice", "slow refund", "fenced")]
    result = pf.run(pf.build_config(probes + tickets, base_url=fake.base_url, model=MODEL, sampling=SAMPLING),
                    tmp_path / "knows", timeout_s=120)
    got = {r.case_id: r for r in result.results}
    passed = {k: r.passed for k, r in got.items()}
    assert passed == {"general-f0": True,    # "20, my friend." knows 20
                      "general-f1": False,   # "2000" is not "200"
                      "general-f2": False,   # "Februart" is not February
                      "general-f3": True,    # an alias: 8 for eight
                      "general-f4": True,    # case, spacing and punctuation normalised
                      "general-f5": True,
                      "general-f6": False,   # errored, below
                      "target-charged twice": True,   # every field, in another key order
                      "target-slow refund": False,    # priority low, not high
                      "target-fenced": False}, {k: r.reason for k, r in got.items()}
    # the JS assertion and its Python twin agree on every answer the model gave
    for (q, a, al), case in zip(facts[:6], probes[:6]):
        assert C.knows(got[case.id].output_text, [a, *al]) == got[case.id].passed, q
    assert [C.exact_match(got[c.id].output_text, a) for c, (_, a, _) in zip(probes[:6], facts)] == [
        False, False, False, False, False, True]
    # the request over the context is an error, not a failure: kept out of the pass rate, with its reason
    assert got["general-f6"].error is not None and all(r.error is None for k, r in got.items() if k != "general-f6")
    tests = [{"id": r.case_id, "block": r.block, "passed": r.passed, "errored": r.error is not None,
              "reason": r.reason or r.error or ""} for r in result.results]
    blocks = summarize(tests)
    assert (blocks["general"]["passed"], blocks["general"]["total"], blocks["general"]["errored"]) == (4, 6, 1)
    assert blocks["general"]["errored_reason"] == "1 of 7 not measurable: the prompt exceeds the model's context"
