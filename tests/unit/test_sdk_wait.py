"""The SDK's `wait`: how often it asks a service for a running job (each GetJob reads the job's files from the store
and asks Ray), and that it returns the ended job or times out with the state it saw."""

from __future__ import annotations

import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient


class Clock:
    """time.monotonic and time.sleep of the client module, on a fake clock: sleeps are recorded, not slept."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 4))
        self.now += s


@pytest.fixture
def clock(monkeypatch) -> Clock:
    import services.sdk.client as module

    c = Clock()
    monkeypatch.setattr(module.time, "monotonic", c.monotonic)
    monkeypatch.setattr(module.time, "sleep", c.sleep)
    return c


def client_with_states(monkeypatch, states: list[int]) -> tuple[TuneryClient, list[str]]:
    client = TuneryClient("127.0.0.1:1", "t")  # channels connect lazily: nothing is dialled
    asked: list[str] = []

    def get_job(job_id: str) -> pb.Job:
        asked.append(job_id)
        return pb.Job(id=job_id, state=states[min(len(asked), len(states)) - 1])

    monkeypatch.setattr(client, "get_job", get_job)
    return client, asked


def test_polls_back_off_to_once_a_second_and_the_ended_job_is_returned(monkeypatch, clock):
    running = [pb.JOB_STATE_RUNNING] * 9
    client, asked = client_with_states(monkeypatch, running + [pb.JOB_STATE_SUCCEEDED])
    job = client.wait("j1", timeout=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED and len(asked) == 10
    assert clock.sleeps == [0.2, 0.3, 0.45, 0.675, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_a_job_that_ended_already_costs_one_poll(monkeypatch, clock):
    client, asked = client_with_states(monkeypatch, [pb.JOB_STATE_FAILED])
    assert client.wait("j2").state == pb.JOB_STATE_FAILED and asked == ["j2"] and clock.sleeps == []


def test_timeout_names_the_state_and_does_not_sleep_past_the_deadline(monkeypatch, clock):
    client, asked = client_with_states(monkeypatch, [pb.JOB_STATE_QUEUED])
    with pytest.raises(TimeoutError, match="j3 still JOB_STATE_QUEUED after 3s"):
        client.wait("j3", timeout=3)
    assert clock.now <= 3.0 + 0.02 + 1.0 and all(s <= 1.0 for s in clock.sleeps)


def test_delete_deployment_waits_longer_than_the_service_does():
    """DeleteDeployment answers once the service's delete job has ended (up to its delete_timeout_s): the client's
    deadline must outlast that wait, or a slow but successful delete reads as DEADLINE_EXCEEDED (a test run saw it
    at the default 30 s)."""
    from services.serving.service import ServingSettings

    client = TuneryClient("127.0.0.1:1", "t")
    seen = {}

    class Stub:
        def DeleteDeployment(self, request, metadata=None, timeout=None):
            seen.update(name=request.name, timeout=timeout)
            return "deleted"

    client.serving = Stub()
    assert client.delete_deployment("d") == "deleted" and seen["name"] == "d"
    assert seen["timeout"] > ServingSettings.model_fields["delete_timeout_s"].default >= client.timeout
