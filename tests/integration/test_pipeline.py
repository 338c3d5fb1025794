"""The pipeline service end to end on the tiny model: SubmitPipeline (one control-role Ray job driving the stage
services over gRPC) -> stage jobs keyed `<pipeline id>-<stage>` -> one report artifact. A pipeline job killed
mid-training is submitted again and re-attaches to the training job instead of training twice; a cancelled pipeline
cancels the stage job that runs; a bad request is refused before anything is queued. Real Ray, S3 and gRPC.
(The whole arc, with evaluations, merge, quantize and serve, runs on SmolLM2 in the e2e tier: `tunery pipeline
run examples/demo.yaml --smoke`.)"""

from __future__ import annotations

import json
import os
import re
import signal

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from services.pipeline.spec import load_file
from tests.servers import wait_for
from tests.session import arithmetic_rows, fixture_model, job_events, rpc_error, succeeded, write_jsonl

pytestmark = pytest.mark.integration

FILE = """name: {name}
base: {{source: {base}, name: tiny}}
data: {{source: {data}, name: arith}}
prepare: {{holdout_fraction: 0.1, seed: 1}}
train:
  method: lora
  lora: {{rank: 4, alpha: 8}}
  max_steps: {steps}
  micro_batch_size: 4
  max_seq_len: 64
  eval_samples: 0
  checkpoint_every_steps: 10
skip_stages: [prompting, eval, merge, quantize, serve]
resources: {{cpus: 0.5}}
"""


def pipeline_file(tmp_path, name: str, steps: int):
    data = write_jsonl(tmp_path / f"{name}.jsonl", arithmetic_rows(64, seed=5))
    path = tmp_path / f"{name}.yaml"
    path.write_text(FILE.format(name=name, base=fixture_model("tiny-llama"), data=data, steps=steps))
    return load_file(path)


def stage_job(client, job_id: str, state: int | None = None, timeout: float = 300):
    def found():
        try:
            job = client.get_job(job_id)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            return None
        return job if state is None or job.state == state else None
    return wait_for(found, timeout, 0.5, f"{job_id} ({pb.JobState.Name(state) if state else 'any state'})")


def report_of(client, job, tmp_path) -> dict:
    report = next(o.uri for o in job.outputs if "/report-" in o.uri)
    return json.loads(client.download(report, "pipeline.json", tmp_path / "pipeline.json").read_text())


def test_a_killed_pipeline_is_resubmitted_and_reattaches_to_its_training(seed, tmp_path):
    c = seed.client
    spec = pipeline_file(tmp_path, "restart", steps=30)
    first = c.submit_pipeline(spec)
    assert first.id.startswith("restart-") and first.labels["pipeline"] == first.id
    # the pipeline submitted its training stage: kill the pipeline job's process outright (no cleanup at all)
    train = stage_job(c, f"{first.id}-train")
    started = next(e.text for e in job_events(c, first.id) if "pipeline.run started" in e.text)
    os.kill(int(re.search(r"\(pid (\d+)\)", started).group(1)), signal.SIGKILL)
    dead = c.wait(first.id, 120)
    assert dead.state == pb.JOB_STATE_FAILED, pb.JobState.Name(dead.state)
    # the same file again: the next attempt, which finds the training job (still running, or done) and waits on it
    second = c.submit_pipeline(spec)
    assert second.id == f"{first.id}-r2"
    second = succeeded(c, second, 600)
    report = report_of(c, second, tmp_path)
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["import-base", "import-data", "data", "train"]
    assert stages["train"]["job"] == train.id and stages["train"]["reattached"] is True
    assert all(s["reattached"] for s in stages.values())  # nothing before it ran twice either
    trainings = [j for j in c.list_jobs() if j.service == "training" and j.labels.get("pipeline") == first.id]
    assert [j.id for j in trainings] == [train.id]
    assert report["artifacts"]["adapter"] in {o.uri for o in c.get_job(train.id).outputs}
    # a pipeline that succeeded is that pipeline: the same request returns it
    assert c.submit_pipeline(spec).id == second.id


def test_cancelling_a_pipeline_cancels_its_running_stage(seed, tmp_path):
    c = seed.client
    job = c.submit_pipeline(pipeline_file(tmp_path, "cancel", steps=2000))
    train = stage_job(c, f"{job.id}-train", pb.JOB_STATE_RUNNING)
    c.cancel_job(job.id, "changed my mind")
    assert c.wait(job.id, 120).state == pb.JOB_STATE_CANCELLED
    final = c.wait(train.id, 180)
    assert final.state == pb.JOB_STATE_CANCELLED and "cancel" in final.state_reason, final.state_reason
    assert any("its job" in e.text and train.id in e.text for e in job_events(c, job.id))


def test_a_bad_pipeline_is_refused_before_anything_is_queued(seed, tmp_path):
    from services.gen.tunery.v1 import pipeline_pb2

    c = seed.client
    spec = pipeline_file(tmp_path, "bad", steps=1)
    spec.base.source = str(tmp_path / "no-such-model")
    spec.skip_stages.append("train")
    before = {j.id for j in c.list_jobs()}
    code, details = rpc_error(lambda: c.submit_pipeline(spec))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.base.source" in details and "no-such-model" in details and "does not exist" in details, details
    assert "skip_stages[5]" in details and "'train'" in details, details
    code, details = rpc_error(lambda: c.submit_pipeline(pipeline_pb2.PipelineSpec(name="x"),
                                                        key="Not A Valid Id!"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {j.id for j in c.list_jobs()} == before
