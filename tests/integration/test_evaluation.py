"""The evaluation service end to end: SubmitEval (a Ray job in the serve environment that starts a real vLLM CPU
server and runs the real promptfoo CLI) -> report artifacts -> CompareReports; and the refusals.
Real Ray, S3 and gRPC."""

from __future__ import annotations

import json
import random

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import evaluation_pb2 as ev
from services.sdk.client import TuneryClient, ref
from tests.integration.conftest import service_client
from tests.servers import REPO

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


@pytest.fixture
def client(servers, settings):
    """Real registry, datagen, training and evaluation servers bound to this test's project."""
    c = service_client(servers, settings, "datagen", "training", "evaluation")
    yield c
    c.close()


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


def test_user_suite_tool_calls_and_facts_on_the_tiny_model(client, tiny_model, tmp_path):
    model = finished(client, client.import_model(str(tiny_model), "tiny")).outputs[0].uri
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
    assert blocks["EVAL_BLOCK_GENERAL"].total == 5 and blocks["EVAL_BLOCK_TOOL_CALLING"].total == 5
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


def test_refusals(client, tiny_model, tmp_path):
    model = finished(client, client.import_model(str(tiny_model), "tiny")).outputs[0].uri
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
        (ev.EvalSuite(lm_eval_tasks=["hellaswag"]), grpc.StatusCode.FAILED_PRECONDITION, "lm-evaluation-harness"),
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
    from tests.servers import free_port

    dead = ev.EvalTarget(endpoint=pb.OpenAIEndpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m"))
    got, details = _code(lambda: client.submit_eval(dead, tools))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "does not answer" in details
    assert {j.id for j in client.list_jobs()} == before


def style_rows(facts: list[dict], n: int) -> list[dict]:
    """The behaviour to teach: every answer ends with ', my friend.' (a changed answer the base never gives)."""
    return [{"messages": [{"role": "user", "content": f["question"]},
                          {"role": "assistant", "content": f"{f['answer']}, my friend."}]} for f in facts[:n]]


def test_base_vs_adapter_flips_the_target_tests_and_measures_forgetting(client, tmp_path):
    foundation = REPO / "fixtures" / "foundation"  # committed: pretrained on facts by fixtures/build_foundation.py
    assert (foundation / "model.safetensors").exists(), "fixtures/foundation is missing"
    facts = [json.loads(line) for line in (foundation / "facts.jsonl").read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(facts)
    model = finished(client, client.import_model(str(foundation), "foundation")).outputs[0].uri
    data = tmp_path / "style.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in style_rows(facts, 120)))
    raw = finished(client, client.import_dataset(str(data), "style")).outputs[0].uri
    prepared = finished(client, client.prepare_dataset(raw, model, holdout=0.2, seed=1)).outputs[-1].uri
    train = finished(client, client.submit_training({
        "base_model": model, "dataset": prepared, "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "optimizer": {"learning_rate": 0.002, "lr_scheduler": "constant", "warmup_ratio": 0.0}, "epochs": 6,
        "micro_batch_size": 8, "max_seq_len": 128, "eval_samples": 0, "checkpoint_every_steps": 1000}), timeout=900)
    adapter = next(o.uri for o in train.outputs if "/adapter-" in o.uri)
    # the general block asks about facts the style data never used
    others = tmp_path / "facts.jsonl"
    others.write_text("".join(json.dumps(f) + "\n" for f in facts[120:160]))
    probes = finished(client, client.import_dataset(str(others), "other-facts")).outputs[0].uri
    suite = ev.EvalSuite(heldout_dataset=ref(prepared), heldout_assertion=ev.ASSERTION_TYPE_CONTAINS,
                         fact_probes=True, fact_probe_source=ref(probes))
    job = finished(client, client.submit_eval(ev.EvalTarget(adapter=ev.AdapterTarget(
        base_model=ref(model), adapter=ref(adapter))), suite, key="base-vs-adapter"))
    got = reports(client, job)
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
    assert not cmp.adapter_had_no_effect
    # the prompting baseline: same engine family, the system prompt asks for the style
    pjob = finished(client, client.submit_eval(ev.EvalTarget(prompted=ev.PromptedTarget(
        model=ref(model), system_prompt="End every answer with ', my friend.'", few_shot_k=2,
        few_shot_dataset=ref(prepared))), suite, key="prompted"))
    prompted = next(iter(reports(client, pjob).values()))
    cmp2 = client.compare_reports(base.report.uri, cand.report.uri, prompting_baseline=prompted.report.uri)
    assert not cmp2.uncontrolled and any("vs prompting baseline" in r for r in cmp2.verdict_reasons)
    print(f"prompting baseline: {[r for r in cmp2.verdict_reasons if 'prompting' in r]}")
    html = client.download(cmp2.report.uri, "comparison.html", tmp_path / "c.html").read_text()
    assert "side by side" in html and "prompting baseline output" in html


def test_uncontrolled_comparison_is_refused_with_the_differences(client, tiny_model, tmp_path):
    model = finished(client, client.import_model(str(tiny_model), "tiny")).outputs[0].uri
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": str(i), "question": f"Q{i}?", "answer": "A"}) + "\n" for i in range(3)))
    probes = finished(client, client.import_dataset(str(facts), "p")).outputs[0].uri
    suite = ev.EvalSuite(fact_probes=True, fact_probe_source=ref(probes))
    a = finished(client, client.submit_eval(ev.EvalTarget(model=ref(model)), suite, key="greedy"))
    b = finished(client, client.submit_eval(ev.EvalTarget(model=ref(model)), suite, key="sampled",
                                            sampling=pb.SamplingParams(temperature=0.8, max_tokens=8)))
    got, details = _code(lambda: client.compare_reports(a.outputs[0].uri, b.outputs[0].uri))
    assert got == grpc.StatusCode.FAILED_PRECONDITION
    assert "sampling: max_tokens 48 vs 8, temperature 0.0 vs 0.8" in details


def test_an_external_openai_endpoint_is_evaluated_as_is(client, tiny_model, tmp_path):
    """A target given by URL: here a real vLLM server the test starts itself, as a user's deployment would be."""
    from services.evaluation.engine import ServerSpec, VLLMServer

    serve_python = REPO / ".venvs" / "serve" / "bin" / "python"
    spec = ServerSpec(model_dir=str(tiny_model), served_name="deployed-tiny", dtype="float32",
                      tool_call_parser="hermes")
    with VLLMServer(spec, python=str(serve_python), log_path=tmp_path / "vllm.log") as server:
        facts = tmp_path / "facts.jsonl"
        facts.write_text("".join(json.dumps({"id": str(i), "question": f"Q{i}?", "answer": "A"}) + "\n"
                                 for i in range(3)))
        probes = finished(client, client.import_dataset(str(facts), "p")).outputs[0].uri
        target = ev.EvalTarget(endpoint=pb.OpenAIEndpoint(base_url=server.base_url, model="deployed-tiny"))
        job = finished(client, client.submit_eval(target, ev.EvalSuite(fact_probes=True, fact_probe_source=ref(probes),
                                                                       tool_calling=True, max_tests_per_block=3)))
    [(label, r)] = reports(client, job).items()
    assert label == "run" and r.controls.engine == "endpoint" and r.controls.engine_version == server.base_url
    blocks = {ev.EvalBlock.Name(b.block): b.total for b in r.blocks}
    assert blocks == {"EVAL_BLOCK_GENERAL": 3, "EVAL_BLOCK_TOOL_CALLING": 3}
    assert all(t.output or not t.passed for t in r.tests)  # answers came back from the endpoint
