"""Every job-running service exposes the one shared job surface with the shared messages."""

import importlib

import pytest

SERVICES = ["registry", "datagen", "training", "merging", "quantization", "evaluation", "serving", "pipeline"]


@pytest.mark.parametrize("name", SERVICES)
def test_job_surface(name):
    mod = importlib.import_module(f"services.gen.tunery.v1.{name}_pb2")
    svc = next(iter(mod.DESCRIPTOR.services_by_name.values()))
    methods = {m.name: m for m in svc.methods}
    for rpc, req, resp in [("GetJob", "GetJobRequest", "Job"), ("ListJobs", "ListJobsRequest", "ListJobsResponse"),
                           ("CancelJob", "CancelJobRequest", "Job"), ("WatchJob", "WatchJobRequest", "JobEvent")]:
        m = methods[rpc]
        assert m.input_type.full_name == f"tunery.v1.{req}" and m.output_type.full_name == f"tunery.v1.{resp}"
    assert methods["WatchJob"].server_streaming
    submits = [m for m in svc.methods if m.output_type.full_name == "tunery.v1.Job" and m.name not in ("GetJob", "CancelJob")]
    assert submits, "a job-running service needs at least one RPC that submits a job"
    for m in submits:
        assert "options" in m.input_type.fields_by_name, f"{m.name} must take SubmitOptions"


def test_job_states_match_the_openai_names():
    from services.gen.tunery.v1 import common_pb2

    names = [v.name.removeprefix("JOB_STATE_") for v in common_pb2.JobState.DESCRIPTOR.values][1:]
    assert names == ["VALIDATING", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
