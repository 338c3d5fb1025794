"""EvaluationService's lm-eval validation over a fake runner and a local store: what is queued, what is stored (the
inline task files, only once the request is valid), and each refusal with its status; the servicer's proto ->
spec conversion. An endpoint target is a small local HTTP server (a fake of an OpenAI-compatible server)."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from services.core.artifacts import ArtifactStore
from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.store import LocalObjectStore
from services.evaluation.lm_eval_tasks import fact_task_files
from services.evaluation.service import (
    EvaluationService,
    EvaluationSettings,
    InlineSuite,
)
from services.evaluation.servicer import spec_from_pb
from services.core.jobs import SubmitOptions
from services.core.specs import OpenAIEndpointSpec
from services.evaluation.spec import (
    EvalJobSpec,
    LmEvalSpec,
    SuiteSpec,
    TargetSpec,
)
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import evaluation_pb2 as ev
from tests.fakes import FakeRunner, JsonHandler, serve_http

FACTS = [{"id": f"c{i}", "answer": a, "category": "capital", "sentence": f"The capital of {c} is {a}."}
         for i, (c, a) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")])]
GEN = {"task": "gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "fact_sentences.jsonl"}},
       "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{context}}",
       "doc_to_target": "{{choices[label]}}", "generation_kwargs": {"until": ["."]}}
TASK_FILES = fact_task_files(FACTS) | {"gen.yaml": yaml.safe_dump(GEN).encode()}


@pytest.fixture
def env(tmp_path):
    store = ArtifactStore(LocalObjectStore(tmp_path / "s"), "p")
    runner = FakeRunner(store)

    def service(**settings):
        return EvaluationService(store, runner, EvaluationSettings(project="p", port=0, **settings))

    w = store.writer("model", "m")
    w.add_bytes(b"{}", "config.json")
    model = w.commit({"is_causal_lm": True})[0].ref()
    return service, store, runner, model


def submit(svc, spec, inline=None, **options):
    return asyncio.run(svc.submit(spec, inline or InlineSuite(), SubmitOptions(**options)))


def spec(target, **suite):
    return EvalJobSpec(target=target, suite=SuiteSpec(**suite), name="")



def test_inline_task_files_are_resolved_stored_and_queued(env):
    service, store, runner, model = env
    job = submit(service(), spec(TargetSpec(kind="model", model=model), lm_eval=LmEvalSpec(limit=2)),
                 InlineSuite(lm_eval_files=TASK_FILES))
    [req] = runner.submitted
    le = req.spec["suite"]["lm_eval"]
    assert le["tasks"] == ["fact_sentences", "gen"] and le["sources"] == {"fact_sentences": "local", "gen": "local"}
    assert le["output_types"] == {"fact_sentences": ["multiple_choice"], "gen": ["generate_until"]}
    assert not le["hub"] and le["limit"] == 2 and req.role == "serve" and job.id
    stored = store.resolve(EvalJobSpec.model_validate(req.spec).suite.lm_eval.task_files)
    assert stored.kind == "suite" and stored.metadata["format"] == "lm-eval"
    assert {f.path for f in stored.files} == set(TASK_FILES)
    assert stored.metadata["tasks"] == ["fact_sentences", "gen"]
    # the same files again: the same (content-addressed) artifact, by reference this time
    again = spec(TargetSpec(kind="model", model=model), lm_eval=LmEvalSpec(task_files=stored.ref(), tasks=["gen"]))
    submit(service(), again)
    assert runner.submitted[-1].spec["suite"]["lm_eval"]["tasks"] == ["gen"]


def test_refusals_store_and_queue_nothing(env):
    service, store, runner, model = env
    target = TargetSpec(kind="model", model=model)
    bad_yaml = {"t.yaml": b"task: [x\n"}
    with pytest.raises(InvalidArgument, match=r"spec.suite.lm_eval_files/t.yaml: malformed YAML at line 2"):
        submit(service(), spec(target), InlineSuite(lm_eval_files=bad_yaml))
    with pytest.raises(InvalidArgument, match="did you mean gen"):
        submit(service(), spec(target, lm_eval=LmEvalSpec(tasks=["gen2"])), InlineSuite(lm_eval_files=TASK_FILES))
    with pytest.raises(FailedPrecondition, match="arc_easy need the Hugging Face hub.*local task files"):
        submit(service(lm_eval_hub=False), spec(target, lm_eval=LmEvalSpec(tasks=["arc_easy"])))
    with pytest.raises(ResourceExhausted, match="more than the 1,000 allowed"):
        submit(service(max_inline_suite_bytes=1000), spec(target), InlineSuite(lm_eval_files=TASK_FILES))
    w = store.writer("suite", "promptfoo-suite")
    w.add_bytes(b"prompts: [x]\n", "promptfooconfig.yaml")
    pf = w.commit({"format": "promptfoo"})[0].ref()
    with pytest.raises(FailedPrecondition, match="is a promptfoo suite, not lm-eval task files"):
        submit(service(), spec(target, lm_eval=LmEvalSpec(task_files=pf)))
    with pytest.raises(InvalidArgument, match="inline or as an artifact"):
        submit(service(), spec(target, lm_eval=LmEvalSpec(task_files=pf)), InlineSuite(lm_eval_files=TASK_FILES))
    assert not runner.submitted
    assert [m.metadata["format"] for m in store.list("suite", "")[0]] == ["promptfoo"]  # only the one made here


def test_a_hub_task_is_queued_where_workers_may_reach_the_hub(env):
    service, _, runner, model = env
    submit(service(), spec(TargetSpec(kind="model", model=model), lm_eval=LmEvalSpec(tasks=["hellaswag"])))
    le = runner.submitted[-1].spec["suite"]["lm_eval"]
    assert le["sources"] == {"hellaswag": "standard"} and le["hub"] and le["task_files"] is None


class _Endpoint(JsonHandler):
    tokenizes = False

    def do_GET(self):
        if self.path == "/v1/models":
            return self.send_json(200, {"data": [{"id": "m"}]})
        if self.path == "/tokenizer_info" and self.tokenizes:
            return self.send_json(200, {"eos_token": "</s>"})
        return self.send_json(404, {"error": "not found"})

    def do_POST(self):
        self.read_json()
        if self.path == "/tokenize" and self.tokenizes:
            return self.send_json(200, {"tokens": [1, 2]})
        return self.send_json(404, {"error": "not found"})


@pytest.fixture
def endpoint():
    servers = []

    def start(tokenizes: bool) -> str:
        servers.append(serve_http(type("H", (_Endpoint,), {"tokenizes": tokenizes})))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()


def test_log_likelihood_tasks_need_an_endpoint_that_serves_its_tokenizer(env, endpoint):
    service, _, runner, _ = env
    plain = TargetSpec(kind="endpoint", endpoint=OpenAIEndpointSpec(base_url=endpoint(False), model="m"))
    with pytest.raises(FailedPrecondition, match=r"fact_sentences score log-likelihoods.*serves no tokenizer"):
        submit(service(), spec(plain), InlineSuite(lm_eval_files=TASK_FILES))
    submit(service(), spec(plain, lm_eval=LmEvalSpec(tasks=["gen"])), InlineSuite(lm_eval_files=TASK_FILES))
    tokenizing = TargetSpec(kind="endpoint", endpoint=OpenAIEndpointSpec(base_url=endpoint(True), model="m"))
    submit(service(), spec(tokenizing), InlineSuite(lm_eval_files=TASK_FILES))
    assert [r.spec["suite"]["lm_eval"]["tasks"] for r in runner.submitted] == [["gen"], ["fact_sentences", "gen"]]


def test_the_servicer_converts_lm_eval_fields():
    s = ev.EvalSpec(target=ev.EvalTarget(model=pb.ArtifactRef(uri="tunery://p/model/x")), suite=ev.EvalSuite(
        lm_eval_tasks=["a", "b"], lm_eval_files=[ev.SuiteFile(path="t.yaml", content=b"task: a\n")],
        lm_eval=ev.LmEvalOptions(num_fewshot=0, limit=5, apply_chat_template=True)))
    js, inline = spec_from_pb(s)
    le = js.suite.lm_eval
    assert (le.tasks, le.num_fewshot, le.limit, le.apply_chat_template) == (["a", "b"], 0, 5, True)
    assert inline.lm_eval_files == {"t.yaml": b"task: a\n"}
    unset = ev.EvalSpec(target=s.target, suite=ev.EvalSuite(lm_eval_tasks=["a"]))
    assert spec_from_pb(unset)[0].suite.lm_eval.num_fewshot is None  # each task's own default
    with pytest.raises(InvalidArgument, match="options without tasks"):
        spec_from_pb(ev.EvalSpec(target=s.target, suite=ev.EvalSuite(lm_eval=ev.LmEvalOptions(limit=1))))
    twice = ev.EvalSuite(lm_eval_files=[ev.SuiteFile(path="t.yaml"), ev.SuiteFile(path="t.yaml")])
    with pytest.raises(InvalidArgument, match="given twice"):
        spec_from_pb(ev.EvalSpec(target=s.target, suite=twice))


def test_gates_given_in_part_take_the_defaults_for_the_rest_and_bad_ones_are_named():
    import math

    from services.core.errors import InvalidArgument
    from services.evaluation.scoring import Gates
    from services.evaluation.servicer import gates_from_pb
    from services.gen.tunery.v1 import evaluation_pb2 as ev

    assert gates_from_pb(ev.Gates()) == Gates()
    partial = gates_from_pb(ev.Gates(min_target_pass_rate=0.8))
    assert partial == Gates(min_target_pass_rate=0.8) and partial.require_target_gain
    assert gates_from_pb(ev.Gates(require_target_gain=False, max_general_drop_points=0.0)) == Gates(
        require_target_gain=False, max_general_drop_points=0.0)
    for bad, field in ((ev.Gates(min_target_pass_rate=80), "min_target_pass_rate"),
                       (ev.Gates(max_general_drop_points=math.nan), "max_general_drop_points"),
                       (ev.Gates(max_tool_calling_drop_points=-1), "max_tool_calling_drop_points")):
        with pytest.raises(InvalidArgument, match=f"gates.{field}"):
            gates_from_pb(bad)


def test_the_engine_dtype_is_selected_by_device_and_form():
    from services.core.vllm import engine_dtype

    assert engine_dtype("cpu", quantized=False) == "float32"  # full precision on CPU: the weights as stored
    assert engine_dtype("cpu", quantized=True) == "auto"      # W4A16's CPU kernel has no float32 form
    assert engine_dtype("cuda", quantized=False) == engine_dtype("cuda", quantized=True) == "auto"


def test_the_prompting_baseline_rides_on_the_adapter_targets_engine(env):
    """AdapterTarget.prompting: the base prompted is a third run on the adapter's engine (one engine start, not two),
    validated as a prompted target is; its report states what ran (the base prompted, no adapter)."""
    from services.evaluation.job import is_prompting, run_target

    service, store, runner, model = env
    w = store.writer("adapter", "a")
    w.add_bytes(b"{}", "adapter_config.json")
    adapter = w.commit({"base_model": model.uri})[0].ref()
    w = store.writer("dataset", "d")
    w.add_bytes(b'{"messages": []}\n', "train.jsonl")
    w.add_bytes(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
                "holdout.jsonl")
    data = w.commit({"stage": "prepared", "num_holdout": 1})[0].ref()
    base, ad = pb.ArtifactRef(uri=model.uri), pb.ArtifactRef(uri=adapter.uri)
    s = ev.EvalSpec(target=ev.EvalTarget(adapter=ev.AdapterTarget(base_model=base, adapter=ad, prompting=ev.PromptedTarget(
        system_prompt="Be brief.", few_shot_k=2, few_shot_dataset=pb.ArtifactRef(uri=data.uri)))),
        suite=ev.EvalSuite(heldout_dataset=pb.ArtifactRef(uri=data.uri)))
    js, _ = spec_from_pb(s)
    t = js.target
    assert (t.kind, t.system_prompt, t.few_shot_k, t.few_shot_dataset.uri, t.prompting) == (
        "adapter", "Be brief.", 2, data.uri, True)
    submit(service(), js)
    [req] = runner.submitted
    queued = EvalJobSpec.model_validate(req.spec)
    assert queued.target.few_shot_dataset.sha256 == data.sha256  # resolved, as a prompted target's is
    assert [is_prompting(queued, label) for label in ("candidate", "baseline", "prompting")] == [False, False, True]
    assert run_target(queued, "prompting")["kind"] == "prompted" and run_target(queued, "prompting")["adapter"] is None
    assert run_target(queued, "candidate")["adapter"]["uri"] == adapter.uri
    # without a prompting part an adapter target makes no prompting run
    plain, _ = spec_from_pb(ev.EvalSpec(target=ev.EvalTarget(adapter=ev.AdapterTarget(base_model=base, adapter=ad)),
                                        suite=s.suite))
    assert not plain.target.prompting and not is_prompting(plain, "prompting")
    # refused, naming the field: another model, shots without a dataset, a dataset that is not prepared
    other = ev.PromptedTarget(model=pb.ArtifactRef(uri="tunery://p/model/other"), system_prompt="x")
    with pytest.raises(InvalidArgument, match="spec.target.adapter.prompting.model"):
        spec_from_pb(ev.EvalSpec(target=ev.EvalTarget(adapter=ev.AdapterTarget(
            base_model=base, adapter=ad, prompting=other)), suite=s.suite))
    no_data = js.target.model_copy(update={"few_shot_dataset": None})
    with pytest.raises(InvalidArgument, match="spec.target.adapter.prompting.few_shot_dataset"):
        submit(service(), js.model_copy(update={"target": no_data}))
    raw = store.writer("dataset", "raw")
    raw.add_bytes(b"{}\n", "data.jsonl")
    unprepared = js.target.model_copy(update={"few_shot_dataset": raw.commit({"stage": "raw"})[0].ref()})
    with pytest.raises(FailedPrecondition, match="spec.target.adapter.prompting.few_shot_dataset: .* not a prepared"):
        submit(service(), js.model_copy(update={"target": unprepared}))
    assert len(runner.submitted) == 1


def test_the_cli_puts_the_prompting_baseline_on_the_adapters_engine():
    """`tunery eval run --model B --adapter A --system-prompt S --few-shot K`: one adapter target with a prompting
    part (one engine); without --adapter the prompted target of its own, as before."""
    from services.cli.commands.evaluate import _eval_target

    both = _eval_target("tunery://p/model/b", "tunery://p/adapter/a", "Be brief.", 2, "tunery://p/dataset/d", "", "", "")
    a = both.adapter
    assert both.WhichOneof("form") == "adapter" and a.HasField("prompting") and not a.prompting.model.uri
    assert (a.prompting.system_prompt, a.prompting.few_shot_k, a.prompting.few_shot_dataset.uri) == (
        "Be brief.", 2, "tunery://p/dataset/d")
    assert not _eval_target("tunery://p/model/b", "tunery://p/adapter/a", "", 0, "", "", "", "").adapter.HasField(
        "prompting")
    alone = _eval_target("tunery://p/model/b", "", "Be brief.", 0, "", "", "", "")
    assert alone.WhichOneof("form") == "prompted" and alone.prompted.model.uri == "tunery://p/model/b"
    assert spec_from_pb(ev.EvalSpec(target=both, suite=ev.EvalSuite(tool_calling=True)))[0].target.prompting


def test_a_gguf_model_is_evaluated_through_llama_cpp_without_lora_or_tool_calls(env):
    """A GGUF artifact is a model target (the job serves it with llama.cpp's server); an adapter on it, or the
    tool-calling block (no tool-call parser there), is refused before anything is queued, naming what to do."""
    service, store, runner, model = env
    w = store.writer("model", "m-gguf")
    w.add_bytes(b"GGUF", "m-gguf.gguf")
    gguf = w.commit({"format": "gguf", "form": "quantized", "gguf_file": "m-gguf.gguf", "is_causal_lm": True,
                     "quantized_from": model.uri, "has_chat_template": True})[0].ref()
    w = store.writer("dataset", "d")
    w.add_bytes(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
                "holdout.jsonl")
    data = w.commit({"stage": "prepared", "num_holdout": 1})[0].ref()
    submit(service(), spec(TargetSpec(kind="model", model=gguf), heldout_dataset=data))
    [req] = runner.submitted
    assert req.spec["target"]["model"]["uri"] == gguf.uri and req.role == "serve"
    with pytest.raises(FailedPrecondition, match=f"tool calling on {model.uri}"):
        submit(service(), spec(TargetSpec(kind="model", model=gguf), heldout_dataset=data, tool_calling=True))
    w = store.writer("adapter", "a")
    w.add_bytes(b"{}", "adapter_config.json")
    adapter = w.commit({})[0].ref()
    with pytest.raises(FailedPrecondition, match="no LoRA there"):
        submit(service(), spec(TargetSpec(kind="adapter", model=gguf, adapter=adapter), heldout_dataset=data))
    assert len(runner.submitted) == 1
