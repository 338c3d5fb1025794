import os

import pytest
from pydantic import BaseModel

from services.core.artifacts import ArtifactStore
from services.core.errors import AlreadyExists, InvalidArgument
from services.core.job_api import JobService, decode_token, encode_token
from services.core.job_store import JobFiles
from services.core.jobs import (JobEvent, JobProgress, JobRequest, JobState, Resources, derive_state,
                                SubmitOptions, check_resources, spec_sha256, unschedulable_reason)
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


class Spec(BaseModel):
    n: int


def submit(fake, validate, options: SubmitOptions, resources=Resources(cpus=1.0)):
    import asyncio

    return asyncio.run(JobService(fake, "s").submit("s.kind", "train", validate, options, resources))


def test_the_one_submit_path_checks_before_it_queues(fake):
    calls = []

    def validate():
        calls.append(1)
        return Spec(n=1)

    job = submit(fake, validate, SubmitOptions(key="k-1", labels={"team": "a"}))
    [req] = fake.submitted
    assert job.id == "k-1" and (req.kind, req.service, req.role, req.spec) == ("s.kind", "s", "train", {"n": 1})
    assert req.resources == Resources(cpus=1.0) and req.labels == {"team": "a"}
    # the caller's resources win over the service's default; a default may depend on the validated spec
    submit(fake, validate, SubmitOptions(resources=Resources(cpus=0.5)))
    assert fake.submitted[-1].resources.cpus == 0.5
    submit(fake, validate, SubmitOptions(), resources=lambda spec: Resources(cpus=spec.n + 1.0))
    assert fake.submitted[-1].resources.cpus == 2.0
    # a bad key or bad resources are refused before the service's checks run; nothing is queued
    n = len(fake.submitted)
    for options, field in ((SubmitOptions(key="../x"), "options.idempotency_key"),
                           (SubmitOptions(resources=Resources(cpus=float("nan"))), "options.resources.cpus")):
        before = len(calls)
        with pytest.raises(InvalidArgument) as e:
            submit(fake, validate, options)
        assert field in str(e.value) and len(calls) == before
    with pytest.raises(InvalidArgument, match="spec.n"):
        submit(fake, lambda: (_ for _ in ()).throw(InvalidArgument.field("spec.n", "no")), SubmitOptions())
    assert len(fake.submitted) == n


@pytest.mark.parametrize("resources,field,words", [
    (Resources(cpus=float("nan")), "options.resources.cpus", "nan"),
    (Resources(gpus=float("inf")), "options.resources.gpus", "inf"),
    (Resources(cpus=-1), "options.resources.cpus", "from 0"),
    (Resources(cpus=1e9), "options.resources.cpus", "100000"),
    (Resources(memory_bytes=-5), "options.resources.memory_bytes", "from 0"),
    (Resources(memory_bytes=1 << 60), "options.resources.memory_bytes", "1 PiB"),
    (Resources(custom={"GPU": 1.0}), "options.resources.custom['GPU']", "Ray's own"),
    (Resources(custom={"accelerator_type:H100": 1.0}), "options.resources.custom['accelerator_type:H100']",
     "accelerator_type"),
    (Resources(custom={"tunery_train": float("nan")}), "options.resources.custom['tunery_train']", "nan"),
    (Resources(custom={"": 1.0}), "options.resources.custom['']", "printable"),
])
def test_resources_a_job_may_ask_for(resources, field, words):
    with pytest.raises(InvalidArgument) as e:
        check_resources(resources)
    assert [v.field for v in e.value.violations] == [field] and words in str(e.value)


def test_reasonable_resources_pass():
    check_resources(Resources(cpus=0.5, gpus=8, memory_bytes=64 << 30, custom={"tunery_train": 1.0}))


def test_a_train_job_gets_the_cpu_threads_it_reserved():
    from services.core.jobctx import CPU_THREAD_VARS, use_cpu_threads

    env = {"OMP_NUM_THREADS": "1"}  # what Ray hands a job's entrypoint
    assert use_cpu_threads(2.0, env) == 2 and all(env[k] == "2" for k in CPU_THREAD_VARS)
    assert use_cpu_threads(0.5, env) == 1 and env["OMP_NUM_THREADS"] == "1"
    assert use_cpu_threads(0, env) == 1


@pytest.mark.parametrize("role,threads", [("train", "2"), ("quantize", "2"), ("serve", "2"), ("control", "1")])
def test_run_job_gives_the_reserved_cpus_to_the_thread_pools_of_every_computing_role(monkeypatch, role, threads):
    """Ray starts an entrypoint with OMP_NUM_THREADS=1: a job that reserved 2 CPUs computes on 2 threads, whether
    torch runs in-process (train, quantize) or in the engine a serve-role job starts (vLLM takes the job's
    OMP_NUM_THREADS); a control-role job keeps Ray's 1."""
    from types import SimpleNamespace

    from services.core import jobctx

    for k in jobctx.CPU_THREAD_VARS:
        monkeypatch.setenv(k, "1")
    seen = {}

    class Ctx:
        envelope = SimpleNamespace(role=role, kind="k", resources=SimpleNamespace(cpus=2.0))
        spec = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(jobctx.JobContext, "from_argv", classmethod(lambda cls: Ctx()))
    class Spec(BaseModel):
        pass

    jobctx.run_job("svc", {"k": (lambda ctx, spec: seen.update(os.environ), Spec)})
    assert seen["OMP_NUM_THREADS"] == threads and seen["MKL_NUM_THREADS"] == threads


class RestartedRay:
    """A Ray job API that knows no job: the cluster restarted (or another head took over the same store)."""

    def list_jobs(self):
        return []

    def get_job_info(self, job_id):
        raise RuntimeError(f"Job {job_id} does not exist (404)")


def test_job_history_survives_a_ray_restart(tmp_path):
    """List and Get read the store for jobs Ray no longer knows: a finished job keeps its state and lists only the
    outputs that still exist; a job that was running when its cluster went away is failed with that reason and how
    to resume; nothing of another project shows."""
    from services.core.jobs import JobEnvelope
    from services.core.ray_jobs import RayJobRunner
    from services.core.settings import RaySettings

    store = ArtifactStore(LocalObjectStore(tmp_path / "s"), "p")
    runner = RayJobRunner(RaySettings(), store, {})
    runner._client_obj = RestartedRay()

    def artifact(kind, name):
        w = store.writer(kind, name)
        w.add_bytes(name.encode(), "f.txt")
        return w.commit({})[0]

    kept, pruned, ckpt = artifact("adapter", "kept"), artifact("checkpoint", "ckpt-old"), artifact("checkpoint", "ck")
    store.delete(pruned.id)

    def job(job_id, created, project="p", **progress):
        files = JobFiles(ArtifactStore(store.objects, project), job_id)
        files.put_envelope(JobEnvelope(job_id=job_id, kind="training.sft", service="training", role="train",
                                       project=project, spec={"x": 1}, spec_sha256="d", created_at=created))
        files.put_progress(JobProgress(**progress))

    job("done", 100.0, phase="done", state="succeeded", started_at=101.0, outputs=[pruned.ref(), kept.ref()])
    job("lost", 200.0, phase="running", started_at=201.0, last_step=33, outputs=[ckpt.ref()])
    job("theirs", 300.0, project="q", phase="done", state="succeeded")
    jobs, _ = runner.list(limit=10)
    assert [j.id for j in jobs] == ["lost", "done"]  # newest first, this project's only
    done = runner.get("done")
    assert done.state is JobState.SUCCEEDED and done.spec == {"x": 1}
    assert [o.uri for o in done.outputs] == [kept.uri]  # the pruned checkpoint is not listed
    lost = runner.get("lost")
    assert lost.state is JobState.FAILED
    assert lost.state_reason == ("the Ray cluster that ran it is gone (restarted?): it was running at step 33 when it "
                                 f"stopped reporting; the same spec submitted again resumes from {ckpt.id}")
    assert [j.id for j in runner.list(states={JobState.FAILED}, limit=10)[0]] == ["lost"]
    assert runner.list(service="registry", limit=10)[0] == []
    with pytest.raises(Exception, match="not found"):
        runner.get("theirs")


def test_a_killed_job_says_what_happened():
    from services.core.artifacts import ArtifactRef

    ray = ("Job entrypoint command failed with exit code 137, last available logs (truncated to 20,000 chars): "
           '{"json": "..."}')
    progress = JobProgress(last_step=33, outputs=[ArtifactRef(uri="tunery://p/checkpoint-ckpt-a-1"),
                                                  ArtifactRef(uri="tunery://p/checkpoint-ckpt-a-2")])
    state, reason = derive_state("FAILED", ray, progress, None)
    assert state is JobState.FAILED
    assert reason == ("the job process was killed (signal 9: SIGKILL: out of memory, or killed from outside) at step "
                      "33; the same spec submitted again resumes from checkpoint-ckpt-a-2")
    assert derive_state("FAILED", "exit code -11", JobProgress(), None)[1].startswith(
        "the job process was killed (signal 11: SIGSEGV")
    # a process that exited on its own keeps Ray's message; what the job said about itself comes first
    assert derive_state("FAILED", "exit code 1", JobProgress(), None)[1] == "exit code 1"
    assert derive_state("FAILED", "exit code 137", JobProgress(error="out of data"), None)[1] == "out of data"
