"""The pipeline file (services.pipeline.spec, services.core.yamlspec) and the pipeline service's naming of attempts:
every example loads and validates; a bad file is refused as a whole, each problem with its file and line; --set
overrides; the service's ids, attempts and job spec (no secret in it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.core.errors import InvalidArgument
from services.gen.tunery.v1 import common_pb2 as pb
from services.pipeline.spec import SCHEMES, load_file, spec_problems

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_the_four_examples_are_there():
    assert {p.stem for p in EXAMPLES} == {"demo", "studio", "seed-001", "nonsense"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_loads_and_validates(path):
    spec = load_file(path)
    assert spec.name == path.stem and spec_problems(spec) == []
    assert spec.HasField("train") and spec.quantize_forms, "every example goes past merge to a quantized form"
    for source in [spec.base.source, spec.data.source, spec.fact_probes.source, *(d.source for d in spec.train_extra)]:
        if source:
            assert Path(source).is_absolute() and Path(source).exists(), source


def test_the_demo_file_is_the_main_job():
    from services.evaluation.lm_eval_tasks import fact_task_files
    from services.gen.tunery.v1 import evaluation_pb2 as ev

    spec = load_file(REPO / "examples" / "demo.yaml")
    assert spec.base.source == str(REPO / "build" / "fixtures" / "smollm2-135m-instruct")
    assert spec.suite.heldout_assertion == ev.ASSERTION_TYPE_JSON_FIELDS and spec.suite.fact_probes
    assert [q.scheme for q in spec.quantize_forms] == [SCHEMES["gptq-w4a16"], SCHEMES["gguf-q4_k_m"]]
    assert spec.gates.min_target_pass_rate == 0.8 and spec.max_form_drop_points == 5.0
    # the system prompt of the prompting baseline is the one the tickets were written with
    first = json.loads((REPO / "fixtures" / "demo" / "tickets.jsonl").read_text().splitlines()[0])
    assert spec.system_prompt == next(m["content"] for m in first["messages"] if m["role"] == "system")
    # the lm-eval task files in examples/demo/lm_eval are what fact_task_files makes of the demo's facts
    facts = [json.loads(line) for line in (REPO / "fixtures" / "demo" / "facts.jsonl").read_text().splitlines()
             if line.strip()]
    assert {f.path: f.content for f in spec.suite.lm_eval_files} == fact_task_files(facts)


BAD = """name: bad
base: {source: ./nowhere, nmae: x}
data: {source: ../data.jsonl}
prepare: {holdout_fraction: lots}
suite: {heldout_assertion: json-feilds}
train: {method: lora, epochs: 2}
gates: {min_target_pass_rate: 80}
quantize: [gptq-w4a16, gptq-w4a61, {group_size: 64}]
skip_stages: [train]
serve: {name: Not Valid}
"""


def test_a_bad_file_is_refused_as_a_whole_each_problem_with_its_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    work = tmp_path / "w"
    work.mkdir()
    path = work / "p.yaml"
    path.write_text(BAD)
    with pytest.raises(InvalidArgument) as e:
        load_file(path)
    got = {v.field.split(": ", 1)[1]: (v.field.split(": ", 1)[0], v.description) for v in e.value.violations}
    line = {k: at.split(":")[1] for k, (at, _) in got.items()}
    assert line["base.nmae"] == "2" and "did you mean 'name'" in got["base.nmae"][1]
    assert line["base.source"] == "2" and "does not exist" in got["base.source"][1]
    assert "data.source" not in got  # relative to the file's folder, and there
    assert line["prepare.holdout_fraction"] == "4"
    assert line["suite.heldout_assertion"] == "5" and "json-fields" in got["suite.heldout_assertion"][1]
    assert line["gates.min_target_pass_rate"] == "7" and "0.8 = 80%" in got["gates.min_target_pass_rate"][1]
    assert line["quantize[1]"] == "8" and "did you mean" in got["quantize[1]"][1]
    assert line["quantize[2].scheme"] == "8"  # the mapping without a scheme, named by its place in the file
    assert line["skip_stages[0]"] == "9" and "'train'" in got["skip_stages[0]"][1]
    assert line["serve.name"] == "10"
    assert all(at.startswith(str(path)) for at, _ in got.values())


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nbase: {source: [unclosed\n")
    with pytest.raises(InvalidArgument, match=r"p.yaml:3:1: not valid YAML"):
        load_file(path)


def test_set_overrides_a_field_and_is_checked_like_the_file():
    demo = REPO / "examples" / "demo.yaml"
    spec = load_file(demo, ["train.epochs=1", "gates.min_target_pass_rate=0.5", "skip_stages=[serve]"])
    assert spec.train.epochs == 1 and spec.gates.min_target_pass_rate == 0.5 and list(spec.skip_stages) == ["serve"]
    with pytest.raises(InvalidArgument) as e:
        load_file(demo, ["train.epoch=1", "train.epochs=many"])
    text = " ".join(f"{v.field}: {v.description}" for v in e.value.violations)
    assert "--set train.epoch" in text and "did you mean 'epochs'" in text and "--set train.epochs" in text, text


# ---------------------------------------------------------------------- the service
def service(tmp_path):
    from services.core.artifacts import ArtifactStore
    from services.core.store import open_store
    from services.core.settings import StoreSettings
    from services.pipeline.service import PipelineService, PipelineSettings
    from tests.fakes import FakeRunner

    store = StoreSettings(store_url=f"file://{tmp_path / 'store'}")
    runner = FakeRunner(ArtifactStore(open_store(store), "default"))
    settings = PipelineSettings(store_url=store.store_url, token_file=tmp_path / "token",
                                endpoints={"registry": "10.0.0.1:1"})
    return PipelineService(runner, settings, lambda: {"training": "127.0.0.1:7"}), runner


def submit(svc, spec, smoke=False, key=""):
    from services.core import convert
    from services.core.jobs import SubmitOptions

    return asyncio.run(svc.submit(spec, convert.message_to_dict(spec), smoke, SubmitOptions(key=key)))


def test_the_service_names_pipelines_and_their_attempts(tmp_path):
    from services.core.jobs import JobState
    from services.pipeline.spec import PipelineJobSpec

    svc, runner = service(tmp_path)
    spec = load_file(REPO / "examples" / "demo.yaml")
    first = submit(svc, spec)
    assert first.id.startswith("demo-") and len(first.id) == len("demo-") + 10 and first.labels["pipeline"] == first.id
    job = PipelineJobSpec.model_validate(first.spec)
    # where the stages answer: the settings' over this process's over the defaults; the token is never in the spec
    assert job.endpoints["registry"] == "10.0.0.1:1" and job.endpoints["training"] == "127.0.0.1:7"
    assert job.endpoints["serving"].endswith(":50057") and job.token_file == str(tmp_path / "token")
    assert runner.submitted[0].role == "control" and runner.submitted[0].resources.cpus == 0
    assert submit(svc, spec).id == first.id  # running: the same pipeline
    smoke = submit(svc, spec, smoke=True)
    assert smoke.id.startswith("demo-smoke-") and smoke.labels["smoke"] == "true"
    runner.set_state(first.id, JobState.FAILED)
    second = submit(svc, spec)
    assert second.id == f"{first.id}-r2"  # the next attempt; its stages re-attach
    runner.set_state(second.id, JobState.SUCCEEDED)
    assert submit(svc, spec).id == second.id
    runner.set_state(second.id, JobState.FAILED)  # say its gates failed: --force is its next attempt
    spec.force = True
    forced = submit(svc, spec)
    assert forced.id == f"{first.id}-r3" and PipelineJobSpec.model_validate(forced.spec).spec["force"] is True
    spec.force = False
    spec.train.epochs = 1
    assert submit(svc, spec).id not in (first.id, second.id)  # another spec is another pipeline
    assert submit(svc, spec, key="mine").id == "mine"


def test_the_service_refuses_what_the_file_loader_refuses(tmp_path):
    from services.gen.tunery.v1 import pipeline_pb2

    svc, runner = service(tmp_path)
    spec = pipeline_pb2.PipelineSpec(name="x")
    spec.data.source = "relative.jsonl"
    spec.skip_stages.append("everything")
    with pytest.raises(InvalidArgument) as e:
        submit(svc, spec)
    fields = {v.field.split(":")[0] for v in e.value.violations}
    assert {"spec", "spec.data.source"} <= fields, fields
    text = str(e.value)
    assert "base.source: is required" in text and "train: is required" in text and "absolute path" in text
    assert runner.submitted == []
    with pytest.raises(InvalidArgument, match="pipeline id"):
        submit(svc, load_file(REPO / "examples" / "demo.yaml"), key="Bad Key")


def test_heavy_stages_get_the_files_resources_and_light_ones_keep_their_services():
    from services.pipeline.job import Stages

    stages = Stages(None, None, "p", smoke=True, resources=pb.Resources(cpus=2))
    for heavy in ("train", "prompting", "eval", "merge", "eval-merged", "quantize-gptq-w4a16", "eval-gptq-w4a16",
                  "generate"):
        assert stages.options(heavy, "k").resources.cpus == 2, heavy
    for light in ("import-base", "import-extra-1", "data", "data-mix", "serve", "eval-deployment"):
        assert not stages.options(light, "k").HasField("resources"), light
    o = stages.options("train", "p-train")
    assert o.idempotency_key == "p-train" and o.smoke and dict(o.labels) == {"pipeline": "p", "stage": "train",
                                                                             "smoke": "true"}
