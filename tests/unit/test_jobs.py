import pytest

from services.core.artifacts import ArtifactStore
from services.core.errors import AlreadyExists, InvalidArgument
from services.core.job_api import JobService, decode_token, encode_token
from services.core.jobs import (JobEvent, JobFiles, JobProgress, JobRequest, JobState, Resources, derive_state,
                                spec_sha256, unschedulable_reason)
from services.core.store import LocalObjectStore
from tests.fakes import FakeRunner


@pytest.mark.parametrize("ray,phase,cancel,want", [
    ("PENDING", "", None, JobState.QUEUED),
    ("PENDING", "", "user", JobState.CANCELLED),         # Ray cannot stop a pending job; the marker decides
    ("RUNNING", "validating", None, JobState.VALIDATING),
    ("RUNNING", "running", None, JobState.RUNNING),
    ("RUNNING", "running", "user", JobState.RUNNING),    # stopping: not terminal until Ray says so
    ("SUCCEEDED", "done", "user", JobState.SUCCEEDED),   # finished before the cancel landed
    ("FAILED", "running", None, JobState.FAILED),
    ("FAILED", "running", "user", JobState.CANCELLED),
    ("STOPPED", "running", None, JobState.CANCELLED),
])
def test_derive_state(ray, phase, cancel, want):
    state, reason = derive_state(ray, "ray says", JobProgress(phase=phase, error="boom" if ray == "FAILED" else ""), cancel)
    assert state is want
    if want is JobState.FAILED:
        assert reason == "boom"
    if cancel and want is JobState.RUNNING:
        assert reason.startswith("cancelling")


def test_terminal_states():
    assert {s for s in JobState if s.is_terminal()} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def test_unschedulable_reason():
    cpu_node = {"CPU": 2.0, "memory": 16 * 2**30}
    assert unschedulable_reason(Resources(cpus=1), [cpu_node]) == ""
    why = unschedulable_reason(Resources(cpus=1, gpus=1), [cpu_node])
    assert "1 GPU" in why and "largest node has 0" in why
    why = unschedulable_reason(Resources(cpus=1, memory_bytes=64 * 2**30), [cpu_node])
    assert "64.0 GiB memory" in why and "16.0 GiB" in why
    assert unschedulable_reason(Resources(cpus=1, gpus=1), [cpu_node, {"CPU": 8, "GPU": 1}]) == ""
    assert "no Ray nodes" in unschedulable_reason(Resources(), [])


def test_spec_hash_is_canonical():
    assert spec_sha256("k", "p", {"a": 1, "b": 2}) == spec_sha256("k", "p", {"b": 2, "a": 1})
    assert spec_sha256("k", "p", {"a": 1}) != spec_sha256("k", "q", {"a": 1})


def test_page_tokens():
    assert decode_token(encode_token(40)) == 40 and encode_token(0) == "" and decode_token("") == 0
    with pytest.raises(InvalidArgument):
        decode_token("garbage!")


@pytest.fixture
def fake(tmp_path):
    return FakeRunner(ArtifactStore(LocalObjectStore(tmp_path), "p"))


def test_fake_runner_idempotency_matches_the_contract(fake):
    req = JobRequest(kind="k", service="s", spec={"a": 1}, idempotency_key="key")
    assert fake.submit(req).id == fake.submit(req).id == "key"
    with pytest.raises(AlreadyExists):
        fake.submit(req.model_copy(update={"spec": {"a": 2}}))


def emit(fake, job_id, n, start=1):
    files = JobFiles(fake.artifacts, job_id)
    for c in range(start, start + n):
        files.append_event(JobEvent(cursor=c, job_id=job_id, time=float(c), text=f"e{c}"))


def run(coro_gen):
    import asyncio

    async def collect():
        return [e async for e in coro_gen]

    return asyncio.run(collect())


def test_watch_follows_to_the_closing_event(fake):
    job = fake.submit(JobRequest(kind="k", service="s", spec={}))
    emit(fake, job.id, 3)
    fake.set_state(job.id, JobState.SUCCEEDED)
    events = run(JobService(fake, "s").watch(job.id, 0))
    assert [e.cursor for e in events] == [1, 2, 3, 3]
    assert events[-1].state is JobState.SUCCEEDED and events[-1].text == "job succeeded"
    assert [e.cursor for e in run(JobService(fake, "s").watch(job.id, 2, follow=False))] == [3]
    with pytest.raises(InvalidArgument):
        run(JobService(fake, "s").watch(job.id, -1))
