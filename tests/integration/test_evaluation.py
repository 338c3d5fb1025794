"""The evaluation service end to end: SubmitEval (a Ray job in the serve environment that starts a real vLLM CPU
server and runs the real promptfoo CLI) -> report artifacts -> CompareReports; and the refusals.
Real Ray, S3 and gRPC."""

from __future__ import annotations

import json

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import evaluation_pb2 as ev
from services.sdk.client import TuneryClient, ref
from tests.session import foundation_facts, shuffled_facts

pytestmark = pytest.mark.integration

USER_SUITE = """
description: a user's own suite, run as-is
prompts:
  - "Answer briefly: {{question}}"
tests:
  - vars: {question: "What is 2 plus 2?"}
    assert:
      - type: contains
        value: "the"
  - vars: {question: "Say hello"}
    assert:
      - type: equals
        value: "this exact sentence will not come out"
  - vars: {question: "Give me JSON"}
    assert:
      - type: is-json
  - vars: {question: "Anything"}
    assert:
      - type: javascript
        value: "output.length >= 0"
"""


GEN_TASK = """
task: fact_sentences_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: fact_sentences.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{choices[label]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


def lm_eval_files(rows: list[dict]) -> list[ev.SuiteFile]:
    from services.evaluation.lm_eval_tasks import fact_task_files

    files = fact_task_files(rows) | {"fact_sentences_gen.yaml": GEN_TASK.encode()}
    return [ev.SuiteFile(path=p, content=b) for p, b in files.items()]


@pytest.fixture
def client(seed):
    """Real registry, datagen, training and evaluation servers bound to the seeded project."""
    return seed.client


def endpoint(server, model: str = "foundation") -> ev.EvalTarget:
    """The session's long-lived vLLM server as an eval target: plumbing tests start no engine of their own."""
    return ev.EvalTarget(endpoint=pb.OpenAIEndpoint(base_url=server.base_url, model=model))


def finished(c: TuneryClient, job: pb.Job, timeout: float = 900) -> pb.Job:
    final = c.wait(job.id, timeout)
    assert final.state == pb.JOB_STATE_SUCCEEDED, (pb.JobState.Name(final.state), final.state_reason)
    return final


def reports(c: TuneryClient, job: pb.Job) -> dict[str, ev.EvalReport]:
    out = {}
    for o in job.outputs:
        a = c.get_artifact(o.uri)
        out[a.metadata["label"]] = c.eval_report(o.uri)
    return out


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_user_suite_tool_calls_and_facts_on_the_tiny_model(client, seed, tmp_path):
    """The one model-target job of the run that starts an engine of its own."""
    model = seed.tiny
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} plus {i}?", "answer": str(2 * i)})
                             + "\n" for i in range(6)))
    facts_art = finished(client, client.import_dataset(str(facts), "probes")).outputs[0].uri
    suite = ev.EvalSuite(promptfoo_yaml=USER_SUITE, tool_calling=True, fact_probes=True,
                         fact_probe_source=ref(facts_art), max_tests_per_block=5)
    job = finished(client, client.submit_eval(ev.EvalTarget(model=ref(model)), suite, key="tiny-eval"))
    [(label, r)] = reports(client, job).items()
    assert label == "run" and r.answering_model == "tiny"
    blocks = {ev.EvalBlock.Name(b.block): b for b in r.blocks}
    assert blocks["EVAL_BLOCK_TARGET"].total == 4  # the user's suite, as-is
    tool = blocks["EVAL_BLOCK_TOOL_CALLING"]
    assert blocks["EVAL_BLOCK_GENERAL"].total == 5 and tool.total + tool.errored == 5
    # the built-in suite's tool schemas do not all fit the tiny model's 512-token context: those requests are
    # errored, not failed, and the block says why
    errored = [t for t in r.tests if t.errored]
    assert tool.errored >= 1 and len(errored) == tool.errored and all(not t.passed for t in errored)
    assert tool.errored_reason == f"{tool.errored} of 5 not measurable: the prompt exceeds the model's context"
    by_id = {t.test_id: t for t in r.tests}
    user = [t for t in r.tests if t.block == ev.EVAL_BLOCK_TARGET]
    # the scoring is real: the equals test can only fail, the javascript tautology can only pass
    assert any(not t.passed for t in user) and any(t.passed for t in user)
    assert all(0 <= b.ci_low <= b.pass_rate <= b.ci_high <= 1 for b in r.blocks)
    assert r.controls.engine == "vllm" and r.controls.sampling.temperature == 0 and r.controls.suite_sha256
    assert r.controls.tool_call_parser == "hermes"
    assert all(t.latency_ms >= 0 for t in by_id.values())
    art = client.get_artifact(job.outputs[0].uri)
    files = {f.path for f in art.files}
    assert {"report.json", "report.html"} <= files and any(p.endswith("out.json") for p in files)
    html = client.download(art.id, "report.html", tmp_path / "r.html").read_text()
    assert "Pass rate per block" in html and "tool_calling" in html


def test_refusals(client, seed, tmp_path):
    model = seed.tiny
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    raw = finished(client, client.import_dataset(str(data), "d")).outputs[0].uri
    target = ev.EvalTarget(model=ref(model))
    cases = [
        (ev.EvalSuite(promptfoo_yaml="prompts: [\"x\"]\ntests:\n  - vars: {a: 1}\n    assert: [type: contains\n"),
         grpc.StatusCode.INVALID_ARGUMENT, "line"),
        (ev.EvalSuite(promptfoo_yaml="prompts: [\"x {{a}}\"]\ntests:\n  - vars: {a: 1}\n    assert:\n"
                                     "      - type: sounds-good\n"), grpc.StatusCode.INVALID_ARGUMENT, "sounds-good"),
        (ev.EvalSuite(promptfoo_yaml="prompts: [\"x\"]\ntests: []\n"), grpc.StatusCode.INVALID_ARGUMENT, "zero tests"),
        (ev.EvalSuite(), grpc.StatusCode.INVALID_ARGUMENT, "spec.suite"),
    ]
    before = {j.id for j in client.list_jobs()}
    for suite, code, words in cases:
        got, details = _code(lambda: client.submit_eval(target, suite))
        assert got == code and words in details, (suite, got, details)
    tools = ev.EvalSuite(tool_calling=True)
    got, details = _code(lambda: client.submit_eval(ev.EvalTarget(model=ref(raw)), tools))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "not a model" in details
    got, details = _code(lambda: client.submit_eval(ev.EvalTarget(adapter=ev.AdapterTarget(
        base_model=ref(model), adapter=ref(model))), tools))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "not a adapter" in details
    from services.core.net import free_port

    dead = ev.EvalTarget(endpoint=pb.OpenAIEndpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m"))
    got, details = _code(lambda: client.submit_eval(dead, tools))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "does not answer" in details
    assert {j.id for j in client.list_jobs()} == before


def base_vs_adapter(client, seed) -> pb.Job:
    """The seeded adapter against its base on one engine (keyed: the second test to ask gets the same job)."""
    # the general block asks about facts the style data never used
    # ... as chat questions (fact probes) and, through lm-eval, as plain sentences scored by log-likelihood
    facts = shuffled_facts()[120:160]  # what seed.other_facts holds
    suite = ev.EvalSuite(heldout_dataset=ref(seed.style), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                         fact_probes=True, fact_probe_source=ref(seed.other_facts),
                         lm_eval_files=lm_eval_files(facts)[:2])
    return finished(client, client.submit_eval(ev.EvalTarget(adapter=ev.AdapterTarget(
        base_model=ref(seed.foundation), adapter=ref(seed.style_adapter))), suite,
        key=f"{seed.project}-base-vs-adapter"))


def test_base_vs_adapter_flips_the_target_tests_and_measures_forgetting(client, seed):
    """The one adapter-target job of the run (its own engine: the adapter on and off on it), on the seeded
    adapter: the foundation taught a style (every answer ends with ', my friend.') on the seeded style data."""
    got = reports(client, base_vs_adapter(client, seed))
    base, cand = got["baseline"], got["candidate"]
    assert base.controls == cand.controls  # one engine, adapter on/off: the only difference
    cmp = client.compare_reports(base.report.uri, cand.report.uri,
                                 gates=ev.Gates(min_target_pass_rate=0.5, max_general_drop_points=100))
    target_flips = [f for f in cmp.flips if f.block == ev.EVAL_BLOCK_TARGET]
    up = sum(f.now_passes for f in target_flips)
    print(f"\nflips on the target block: {up} fail->pass, {len(target_flips) - up} pass->fail; deltas "
          f"{dict(cmp.block_deltas)}; verdict {ev.Verdict.Name(cmp.verdict)}; {list(cmp.verdict_reasons)}")
    assert up >= 10 and up > len(target_flips) - up  # the behaviour was learned on held-out questions
    assert "general" in cmp.block_deltas  # forgetting is measured (its size is the model's business)
    # paired: the same held-out questions on both sides, McNemar's exact test on the discordant pairs
    paired = {p.block: p for p in cmp.paired}
    assert paired["target"].gained == up and paired["target"].mcnemar_p < 0.01 and paired["target"].ci_low > 0
    # a style is not forgetting: "Paris, my friend." knows Paris. Exact match drops with the style; the probes
    # lost by knowledge are far fewer than that (forgetting counts those only)
    gen = {lbl: next(b for b in rep.blocks if b.block == ev.EVAL_BLOCK_GENERAL) for lbl, rep in got.items()}
    exact_drop = gen["baseline"].exact_passed - gen["candidate"].exact_passed
    assert gen["candidate"].exact_total > 0 and exact_drop >= 10, (gen, exact_drop)
    assert paired["general"].lost < exact_drop / 2 and paired["general"].forgetting_points == pytest.approx(
        100 * paired["general"].lost / paired["general"].pairs)
    assert not cmp.adapter_had_no_effect
    [delta] = cmp.lm_eval_deltas  # ... by lm-eval too, with an interval, adapter on/off on one engine
    assert delta.task == "fact_sentences" and delta.metric == "acc"
    assert abs(delta.candidate - delta.baseline - delta.delta) < 1e-9 and delta.ci_low <= delta.delta <= delta.ci_high
    assert base.controls.lm_eval_version == cand.controls.lm_eval_version == "0.4.13"
    print(f"lm-eval fact_sentences acc: base {delta.baseline:.3f} -> adapter {delta.candidate:.3f} "
          f"({delta.delta:+.3f}, 95% CI {delta.ci_low:+.3f}..{delta.ci_high:+.3f})")
    # the prompting baseline's half of this comparison runs in the demo (tests/e2e: test_demo_is_the_main_job)
    html = client.download(cmp.report.uri, "comparison.html", seed.work / "base-vs-adapter.html").read_text()
    assert "side by side" in html


def test_blind_ab_votes_become_an_arena_report(client, seed):
    """SaveArenaVotes (what `tunery arena A B` sends once a person has voted): the tally with B's win rate over the
    decisive votes and its Wilson interval, stored as a report artifact whose parents are the two reports; votes it
    cannot place are refused, each by its index, and nothing is stored."""
    from services.evaluation.arena import pairs
    from services.evaluation.scoring import wilson

    got = reports(client, base_vs_adapter(client, seed))
    a, b = got["baseline"].report.uri, got["candidate"].report.uri
    body = {lbl: {"tests": [{"id": t.test_id, "block": "", "prompt": t.prompt, "output": t.output,
                             "errored": t.errored} for t in r.tests]} for lbl, r in got.items()}
    shown, identical = pairs(body["baseline"], body["candidate"])
    assert len(shown) >= 8
    choices = ["b"] * 5 + ["a", "tie", "both_bad"]
    votes = [{"test_id": p.test_id, "choice": c, "a_on_left": p.a_on_left, "seconds": 1.5}
             for p, c in zip(shown, choices)]
    before = {x.id for x in client.list_artifacts(kind=pb.ARTIFACT_KIND_REPORT)}
    for bad, field in (([*votes, votes[0]], "votes[8].test_id"), ([{**votes[0], "test_id": "nope"}], "votes[0].test_id"),
                       ([], "votes"), ([{**votes[0], "choice": ""}], "votes[0].choice")):
        code, details = _code(lambda: client.save_arena_votes(a, b, bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details
    assert _code(lambda: client.save_arena_votes(a, a, votes))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: client.save_arena_votes(a, seed.foundation, votes))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert {x.id for x in client.list_artifacts(kind=pb.ARTIFACT_KIND_REPORT)} == before
    result = client.save_arena_votes(a, b, votes, voter="a test")
    assert (result.a_wins, result.b_wins, result.ties, result.both_bad) == (1, 5, 1, 1)
    assert result.b_win_rate == pytest.approx(5 / 6) and (result.ci_low, result.ci_high) == pytest.approx(wilson(5, 6))
    art = client.get_artifact(result.report.uri)
    assert art.metadata["report"] == "arena" and {p.uri for p in art.parents} == {a, b}
    stored = json.loads(client.download(art.id, "arena.json", seed.work / "arena.json").read_text())
    assert stored["identical"] == identical and stored["voter"] == "a test" and len(stored["votes"]) == 8
    assert stored["sentence"].startswith("B preferred in 5 of 6 decisive votes: 83%")


def test_uncontrolled_comparison_is_refused_with_the_differences(client, vllm_endpoint, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": str(i), "question": f"Q{i}?", "answer": "A"}) + "\n" for i in range(3)))
    probes = finished(client, client.import_dataset(str(facts), "p")).outputs[0].uri
    suite = ev.EvalSuite(fact_probes=True, fact_probe_source=ref(probes))
    target = endpoint(vllm_endpoint)
    a = finished(client, client.submit_eval(target, suite))
    b = finished(client, client.submit_eval(target, suite, sampling=pb.SamplingParams(temperature=0.8, max_tokens=8)))
    got, details = _code(lambda: client.compare_reports(a.outputs[0].uri, b.outputs[0].uri))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "sampling: max_tokens 48 vs 8, temperature 0.0 vs 0.8" in details


def test_an_external_openai_endpoint_is_evaluated_as_is(client, vllm_endpoint, tmp_path):
    """A target given by URL: the session's vLLM server, as a user's deployment would be."""
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": str(i), "question": f"Q{i}?", "answer": "A"}) + "\n"
                             for i in range(3)))
    probes = finished(client, client.import_dataset(str(facts), "p")).outputs[0].uri
    target = endpoint(vllm_endpoint)
    suites_before = {a.id for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_SUITE)}
    # lm-eval's log-likelihoods through the endpoint's own tokenizer (/tokenize), as lm-eval's remote backend
    job = finished(client, client.submit_eval(target, ev.EvalSuite(
        fact_probes=True, fact_probe_source=ref(probes), tool_calling=True, max_tests_per_block=3,
        lm_eval_files=lm_eval_files(foundation_facts()[:10]))))
    # the task files were stored; a later run names them by reference and picks one task
    [stored] = [a.id for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_SUITE) if a.id not in suites_before]
    again = finished(client, client.submit_eval(target, ev.EvalSuite(
        lm_eval_task_files=ref(stored), lm_eval_tasks=["fact_sentences"], lm_eval=ev.LmEvalOptions(limit=4))))
    [(label, r)] = reports(client, job).items()
    assert label == "run" and r.controls.engine == "endpoint" and r.controls.engine_version == vllm_endpoint.base_url
    blocks = {ev.EvalBlock.Name(b.block): b.total + b.errored for b in r.blocks}
    assert blocks == {"EVAL_BLOCK_GENERAL": 3 + 3 + 3, "EVAL_BLOCK_TOOL_CALLING": 3}  # probes + 2 lm-eval tasks
    # the tool schemas of the built-in suite overflow the foundation's 512-token context: errored, not failed
    tool = next(b for b in r.blocks if b.block == ev.EVAL_BLOCK_TOOL_CALLING)
    assert tool.errored >= 1 and "not measurable: the prompt exceeds the model's context" in tool.errored_reason
    assert all(t.output or not t.passed for t in r.tests)  # answers came back from the endpoint
    assert {t.task: t.samples for t in r.lm_eval} == {"fact_sentences": 3, "fact_sentences_gen": 3}
    [(_, r2)] = reports(client, again).items()
    assert [(t.task, t.samples) for t in r2.lm_eval] == [("fact_sentences", 4)]
    assert r2.controls.suite_sha256 != r.controls.suite_sha256


def test_lm_eval_local_task_files_run_against_the_served_model(client, vllm_endpoint, tmp_path):
    """Local lm-eval task files given inline (a multiple-choice task scored by log-likelihoods through vLLM's
    echo+logprobs, a generate_until task scored by exact match) run with real lm-eval against the served
    foundation model; each document becomes a general-block test, the task metrics and lm-eval's own files land in
    the report."""
    suites_before = {a.id for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_SUITE)}
    suite = ev.EvalSuite(lm_eval_files=lm_eval_files(foundation_facts()[:30]))
    job = finished(client, client.submit_eval(endpoint(vllm_endpoint), suite))
    [r] = reports(client, job).values()
    tasks = {t.task: t for t in r.lm_eval}
    assert set(tasks) == {"fact_sentences", "fact_sentences_gen"}
    mc, gen = tasks["fact_sentences"], tasks["fact_sentences_gen"]
    assert (mc.output_type, mc.metric, mc.samples, mc.source) == ("multiple_choice", "acc", 30, "local")
    assert (gen.output_type, gen.metric, gen.samples) == ("generate_until", "exact_match", 30)
    assert 0 <= mc.stderr < 0.5 and "acc_norm" in mc.metrics
    tests = [t for t in r.tests if t.test_id.startswith("lm-eval/")]
    assert len(tests) == 60 and all(t.block == ev.EVAL_BLOCK_GENERAL for t in tests)
    for name, task in tasks.items():  # the per-document tests add up to lm-eval's own metric
        mine = [t for t in tests if t.test_id.startswith(f"lm-eval/{name}/")]
        assert abs(sum(t.passed for t in mine) / len(mine) - task.value) < 1e-9, name
    mc_test = next(t for t in tests if t.test_id == "lm-eval/fact_sentences/0")
    assert mc_test.prompt == "The capital of France is" and mc_test.output  # the choice with the best log-likelihood
    print(f"\nlm-eval on the foundation: fact_sentences acc {mc.value:.3f} ± {mc.stderr:.3f}, "
          f"fact_sentences_gen exact_match {gen.value:.3f}")
    assert gen.value >= 0.5  # the foundation was pretrained on these sentences (greedy completion)
    assert r.controls.lm_eval_version == "0.4.13"
    art = client.get_artifact(job.outputs[0].uri)
    files = {f.path for f in art.files}
    assert any(p.startswith("lm-eval/results_") and p.endswith(".json") for p in files)
    assert any(p.startswith("lm-eval/samples_fact_sentences_gen") for p in files)
    # the inline task files were stored as a suite artifact, reusable by reference
    stored = [a for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_SUITE) if a.id not in suites_before]
    assert [a.metadata["format"] for a in stored] == ["lm-eval"]
    html = client.download(art.id, "report.html", tmp_path / "r.html").read_text()
    assert "lm-eval 0.4.13 tasks" in html and "fact_sentences_gen" in html


def test_lm_eval_refusals_and_a_hub_task_on_an_offline_worker(client, seed):
    model = seed.tiny
    target = ev.EvalTarget(model=ref(model))
    rows = foundation_facts()[:5]
    good = lm_eval_files(rows)
    cases = [
        (ev.EvalSuite(lm_eval_files=[ev.SuiteFile(path="t.yaml", content=b"task: x\ndataset_path: [json\n")]),
         grpc.StatusCode.INVALID_ARGUMENT, "t.yaml: malformed YAML at line"),
        (ev.EvalSuite(lm_eval_tasks=["helaswag"]), grpc.StatusCode.INVALID_ARGUMENT, "did you mean hellaswag"),
        (ev.EvalSuite(lm_eval_files=good, lm_eval_tasks=["fact_sentence"]), grpc.StatusCode.INVALID_ARGUMENT,
         "did you mean fact_sentences"),
        (ev.EvalSuite(lm_eval_files=[*good[:2], ev.SuiteFile(path="fact_sentences_gen.yaml", content=GEN_TASK.replace(
            "exact_match", "exact_mach").encode())]), grpc.StatusCode.INVALID_ARGUMENT, "unknown metric 'exact_mach'"),
        (ev.EvalSuite(lm_eval_files=[good[0], ev.SuiteFile(path="fact_sentences.jsonl", content=b"")]),
         grpc.StatusCode.INVALID_ARGUMENT, "has no rows: zero tests"),
        (ev.EvalSuite(lm_eval_files=[good[0], ev.SuiteFile(path="fact_sentences.jsonl", content=b'{"a": 1}\n{oops\n')]),
         grpc.StatusCode.INVALID_ARGUMENT, "fact_sentences.jsonl: line 2"),
    ]
    before = {j.id for j in client.list_jobs()}
    suites_before = {a.id for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_SUITE)}
    for suite, code, words in cases:
        got, details = _code(lambda: client.submit_eval(target, suite))
        assert got == code and words in details, (suite, got, details)
    assert {j.id for j in client.list_jobs()} == before
    assert {a.id for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_SUITE)} == suites_before  # nothing stored
    # a standard task is accepted where the workers may reach the hub; this machine cannot, and the job says so
    # before it starts a model server
    job = client.wait(client.submit_eval(target, ev.EvalSuite(lm_eval_tasks=["arc_easy"])).id, 600)
    assert job.state == pb.JOB_STATE_FAILED
    assert "Hugging Face hub" in job.state_reason and "local task files" in job.state_reason, job.state_reason
