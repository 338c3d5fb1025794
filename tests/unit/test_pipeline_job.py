"""The pipeline job's stage runner and serve stage against a client fake (tests/integration/test_pipeline.py runs
pipelines for real): a resubmitted pipeline re-attaches to the jobs it started, retries failed ones under the next
key, and deploys again when the deployment its finished serve job made is gone."""

from __future__ import annotations

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import serving_pb2
from services.pipeline.job import Form, Pipeline, Stages, StageFailed


class NotFound(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.NOT_FOUND

    def details(self):
        return "not found"


class FakeCtx:
    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def event(self, text: str, *, level: str = "info", **_):
        self.events.append((level, text))

    def cancel_requested(self):
        return None


class FakeClient:
    """Jobs by idempotency key (each submit succeeds at once) and deployments by name."""

    def __init__(self, jobs: dict[str, int], deployments: dict[str, int]):
        self.jobs = dict(jobs)
        self.deployments = dict(deployments)
        self.submitted: list[str] = []
        self.deleted: list[str] = []
        self.serving = type("Stub", (), {"CreateDeployment": "CreateDeployment"})()

    def get_job(self, key: str) -> pb.Job:
        if key not in self.jobs:
            raise NotFound()
        return pb.Job(id=key, state=self.jobs[key])

    def call(self, method, request):
        key = request.options.idempotency_key
        self.submitted.append(key)
        self.jobs[key] = pb.JOB_STATE_SUCCEEDED
        self.deployments[request.spec.name] = serving_pb2.DEPLOYMENT_STATE_READY
        return pb.Job(id=key, state=pb.JOB_STATE_SUCCEEDED)

    def get_deployment(self, name: str) -> serving_pb2.Deployment:
        if name not in self.deployments:
            raise NotFound()
        return serving_pb2.Deployment(name=name, state=self.deployments[name], base_url=f"http://x/{name}/v1",
                                      served_models=["m"])

    def delete_deployment(self, name: str):
        self.deleted.append(name)
        if self.deployments.pop(name, None) is None:
            raise NotFound()


def pipeline(client: FakeClient, ctx: FakeCtx) -> Pipeline:
    """A Pipeline with only what its serve stage reads (no eval: skipped; not smoke: the deployment stays)."""
    from services.gen.tunery.v1 import pipeline_pb2

    p = object.__new__(Pipeline)
    p.ctx, p.c, p.smoke, p.skip, p.deployment = ctx, client, False, {"eval"}, {}
    p.spec = pipeline_pb2.PipelineSpec(name="demo")
    p.spec.serve.name = "demo"
    p.stages = Stages(ctx, client, "p1", smoke=False, resources=None)
    p.ask = lambda dep: {"model": "m", "reply": "ok"}
    return p


def test_a_stage_reattaches_to_a_running_or_succeeded_job_and_retries_a_failed_one():
    ctx = FakeCtx()
    c = FakeClient({"p1-train": pb.JOB_STATE_SUCCEEDED, "p1-merge": pb.JOB_STATE_FAILED,
                    "p1-merge-r2": pb.JOB_STATE_CANCELLED}, {})
    stages = Stages(ctx, c, "p1", smoke=False, resources=None)
    submit = lambda o: c.call(None, serving_pb2.CreateDeploymentRequest(options=o))  # noqa: E731
    assert stages.run("train", "train", submit).id == "p1-train" and stages.runs["train"].reattached
    assert stages.run("merge", "merge", submit).id == "p1-merge-r3" and not stages.runs["merge"].reattached
    assert stages.run("new", "new", submit).id == "p1-new"
    assert c.submitted == ["p1-merge-r3", "p1-new"]
    # redo: a succeeded job is passed over too (its work is gone)
    assert stages.run("train", "train", submit, redo=True).id == "p1-train-r2"


def test_a_reattached_serve_whose_deployment_is_gone_deploys_again():
    ctx = FakeCtx()
    c = FakeClient({"p1-serve": pb.JOB_STATE_SUCCEEDED}, {"demo": serving_pb2.DEPLOYMENT_STATE_STOPPED})
    p = pipeline(c, ctx)
    p.serve(Form("merged", "tunery://default/model/merged"), "tunery://default/model/base", suite=None)
    assert c.deleted == ["demo"] and c.submitted == ["p1-serve-r2"]
    assert p.deployment["state"] == "READY" and p.deployment["name"] == "demo"
    assert any(level == "warning" and "is STOPPED; deploying it again" in text for level, text in ctx.events)


def test_a_reattached_serve_whose_deployment_is_live_is_kept():
    ctx = FakeCtx()
    c = FakeClient({"p1-serve": pb.JOB_STATE_SUCCEEDED}, {"demo": serving_pb2.DEPLOYMENT_STATE_READY})
    p = pipeline(c, ctx)
    p.serve(Form("merged", "tunery://default/model/merged"), "tunery://default/model/base", suite=None)
    assert c.deleted == [] and c.submitted == [] and p.deployment["state"] == "READY"


def test_a_fresh_deployment_that_is_not_ready_fails_the_stage_with_its_state():
    ctx = FakeCtx()
    c = FakeClient({}, {})
    c.call = lambda method, request: (c.submitted.append(request.options.idempotency_key),  # noqa: E731
                                      c.deployments.__setitem__(request.spec.name,
                                                                serving_pb2.DEPLOYMENT_STATE_FAILED),
                                      pb.Job(id=request.options.idempotency_key,
                                             state=pb.JOB_STATE_SUCCEEDED))[-1]
    p = pipeline(c, ctx)
    with pytest.raises(StageFailed, match="serve: deployment demo is FAILED"):
        p.serve(Form("merged", "tunery://default/model/merged"), "tunery://default/model/base", suite=None)
    assert c.submitted == ["p1-serve"] and c.deleted == []
