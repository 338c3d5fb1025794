"""Data-parallel training through Ray Train (services/training/distributed.py): 2 gloo workers on a real local
Ray head, a local-directory store, the tiny Llama fixture.

Needs torch, transformers and ray.train, so it runs with the train venv, and Ray binds every interface, so inside
the loopback-only namespace:
    infra/scripts/loopback.sh .venvs/train/bin/python -m pytest tests/unit/train/test_distributed.py
Under any other interpreter (the control venv has no torch) the whole module is skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from ray import train as _ray_train  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(
        f"needs torch, transformers and ray.train ({exc}); run with the train venv: "
        "infra/scripts/loopback.sh .venvs/train/bin/python -m pytest tests/unit/train/test_distributed.py",
        allow_module_level=True,
    )

os.environ["HF_HUB_OFFLINE"] = "1"

from services.core.artifacts import ArtifactStore
from services.core.jobctx import JobContext
from services.core.job_store import JobFiles
from services.core.jobs import JobEnvelope
from services.core.settings import StoreSettings
from services.core.store import open_store
from services.training import checkpoints
from services.training.distributed import fit_distributed
from services.training.spec import LoraSpec, OptimizerSpec, TrainingJobSpec

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "build" / "fixtures" / "tiny-llama"
STEPS, EVERY = 6, 3

if not (TINY / "model.safetensors").exists():  # pragma: no cover
    pytest.skip(f"{TINY} is missing: run `make fixtures`", allow_module_level=True)


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"id": str(i), "messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                {"role": "assistant", "content": f"The answer is {a + b}."}],
                    "tools": None, "label": None, "preference": None})
    return out


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` from the control venv when there is one (as in a deployment: the raylet has no
    torch, so the workers only train if fit_distributed's runtime_env points them at this interpreter); the job
    side (this process, the driver) connects through RAY_ADDRESS as a submitted job does."""
    from tests.servers import RayHead, in_loopback_namespace

    if not in_loopback_namespace() and os.environ.get("TUNERY_NETNS") != "0":
        pytest.fail("this test starts a Ray head, which binds every interface: run it through "
                    "infra/scripts/loopback.sh (a loopback-only network namespace), or set TUNERY_NETNS=0")
    control = ROOT / ".venv" / "bin" / "ray"
    # no PYTHONPATH: the workers find `services` only through fit_distributed's runtime_env
    head = RayHead({"PYTHONPATH": ""}, num_cpus=2, ray_bin=control if control.exists() else None)
    patch = pytest.MonkeyPatch()
    # RAY_ADDRESS: Ray Train's internal actors then never guess among the clusters on this machine
    for k, v in {"RAY_ADDRESS": head.gcs_address, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        patch.setenv(k, v)
    try:
        yield head
    finally:
        patch.undo()
        head.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_head):
    """A store with the base model and the prepared dataset committed (the spec's parents), their local folders."""
    tmp = tmp_path_factory.mktemp("dist")
    data = tmp / "data"
    data.mkdir()
    for name, part in (("train.jsonl", rows(32)), ("holdout.jsonl", rows(4, seed=1))):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    settings = StoreSettings(project="dist", store_url=f"file://{tmp / 'store'}", cache_dir=tmp / "cache")
    artifacts = ArtifactStore(open_store(settings), settings.project)
    refs = {}
    for kind, name, folder in (("model", "tiny", TINY), ("dataset", "arith", data)):
        writer = artifacts.writer(kind, name)
        for _ in writer.add_dir(folder):
            pass
        refs[kind] = writer.commit()[0].ref()
    spec = TrainingJobSpec(
        base_model=refs["model"], dataset=refs["dataset"], name="dist", lora=LoraSpec(rank=4, alpha=8, dropout=0.0),
        optimizer=OptimizerSpec(learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant"),
        max_steps=STEPS, micro_batch_size=2, max_seq_len=64, eval_samples=0, checkpoint_every_steps=EVERY,
        keep_checkpoints=2, num_workers=2, worker_cpus=1.0, device="cpu", seed=0)
    return {"tmp": tmp, "settings": settings, "artifacts": artifacts, "spec": spec, "model": TINY, "data": data}


def job(world) -> JobContext:
    """A real JobContext over a fresh envelope in the test's store (what JobContext.from_argv would build)."""
    settings, spec = world["settings"], world["spec"]
    envelope = JobEnvelope(job_id=f"training-{uuid.uuid4().hex[:12]}", kind="training.sft", service="training",
                           role="train", project=settings.project, spec=spec.model_dump(mode="json"),
                           spec_sha256="0" * 64, created_at=time.time())
    ctx = JobContext(open_store(settings), envelope, settings)
    ctx.files.put_envelope(envelope)
    ctx.event("driver: setup done")
    return ctx


def run(world, ctx: JobContext, resume: Path | None = None) -> tuple[dict, Path]:
    out = Path(world["tmp"]) / ctx.job_id
    out.mkdir()
    if resume is not None:  # as job.train does: the checkpoint folder inside the run's output folder
        shutil.copytree(resume, out / resume.name)
        resume = out / resume.name
    result = fit_distributed(ctx, world["spec"], world["model"], world["data"], out, resume)
    ctx.event("driver: collected")
    return result, out


def events(world, ctx: JobContext):
    return JobFiles(world["artifacts"], ctx.job_id).events()


def test_two_workers_then_resume_from_a_checkpoint(world, ray_head):
    spec, artifacts = world["spec"], world["artifacts"]
    print(f"Ray head started in {ray_head.start_s:.1f}s")

    # first run: 6 steps on 2 gloo workers, a checkpoint every 3
    ctx = job(world)
    result, out = run(world, ctx)
    assert "cancelled" not in result, result
    assert result["world_size"] == 2 and result["step"] == STEPS and result["max_steps"] == STEPS
    evs = events(world, ctx)
    texts = [e.text for e in evs]
    assert any("data-parallel run: 2 workers" in t for t in texts), texts
    # one writer at a time: rank 0 continued the driver's cursor and the driver took it back afterwards
    assert [e.cursor for e in evs] == list(range(1, len(evs) + 1)), texts
    assert texts[-1] == "driver: collected" and ctx.progress.last_cursor == len(evs)
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    assert {e.step for e in evs if e.type == "metrics"} == set(range(1, STEPS + 1))
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (out / "adapter" / f).is_file(), f
    # every rank wrote its rng state into the shared folder; rank 0 uploaded the checkpoints
    assert {p.name for p in (out / f"checkpoint-{EVERY}").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                       "rng_state_1.pth"}
    saved = checkpoints.checkpoints(artifacts, spec.checkpoint_name(ctx.job_id))
    assert [int(m.metadata["step"]) for m in saved] == [EVERY, STEPS]
    assert all(m.metadata["job_id"] == ctx.job_id for m in saved)
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= {f.path for f in
                                                                                          saved[0].files}
    assert not (out / ".tunery-stop").exists()

    # second run (another job) resumes from the step-3 checkpoint, as job.train hands it over
    first = saved[0]
    ckpt = artifacts.materialize(first.ref(), world["settings"].cache_dir)
    staged = Path(world["tmp"]) / f"checkpoint-{EVERY}"
    shutil.copytree(ckpt, staged)
    ctx2 = job(world)
    result2, out2 = run(world, ctx2, resume=staged)
    assert result2["world_size"] == 2 and result2["step"] == STEPS
    new_steps = sorted({e.step for e in events(world, ctx2) if e.type == "metrics"})
    assert new_steps == list(range(EVERY + 1, STEPS + 1)), new_steps
    # the resumed run continues the first one: steps 4..6 as before (optimizer, scheduler, rng, data position)
    by_step = {h["step"]: h["loss"] for h in result["log_history"] if "loss" in h}
    again = {h["step"]: h["loss"] for h in result2["log_history"] if "loss" in h and h["step"] > EVERY}
    assert sorted(again) == list(range(EVERY + 1, STEPS + 1))
    for step, loss in again.items():
        assert loss == pytest.approx(by_step[step], rel=1e-2), (step, loss, by_step[step])
    assert (out2 / "adapter" / "adapter_model.safetensors").is_file()
