"""Data-parallel training through Ray Train (train environment): `fit_distributed` is `job.fit` on N workers.

    job.train (the Ray job's driver)            Ray Train TorchTrainer (V2: a controller actor + N worker actors)
    setup: materialise base + data, resume  ->  each worker: JobContext rebuilt from the envelope, then the same
    fit_distributed: connect, run, collect  <-  job.fit(..., is_main=rank == 0); rank 0's return value comes back
    save: the adapter artifact                  as Result.return_value

Design
- One code path for CPU and GPU: `ScalingConfig(num_workers, use_gpu=worker_gpus > 0, resources_per_worker)` and
  `TorchConfig(backend="nccl" on GPU, "gloo" on CPU)`. Ray Train creates the torch.distributed process group and
  sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; transformers' Trainer (through accelerate) finds it, wraps the
  model in DDP (or FSDP when spec.strategy == "fsdp": sft_config turns that into the trainer's `fsdp` argument)
  and shards the data with a DistributedSampler.
- Interpreter: the Ray head and raylets run from the control venv (no torch), and a Ray worker process runs the
  raylet's Python unless its runtime_env says otherwise. The job itself runs in the train venv, so every actor of
  this run (Ray Train's controller, which imports ray.train and hence pandas, and the workers) gets
  `runtime_env={"py_executable": sys.executable}` plus `PYTHONPATH=<repo root>` so `services` imports. Ray
  applies it at job level when we connect (`ray.init(runtime_env=...)`, merged with the env vars the job was
  submitted with) and again per worker (`RunConfig(worker_runtime_env=...)`), so it also holds when the caller
  already connected. `working_dir` is not used: it would upload the repository (virtualenvs included) to the
  cluster for files that are already on this node.
- Events: only rank 0 emits events and uploads checkpoints (JobCallback's is_main); every worker polls the cancel
  marker and `callbacks.agree` all-reduces the decision, so all ranks stop at the same step. A SIGTERM the driver
  gets (Ray's stop_job) is relayed to the workers through a STOP file in `out` (the workers cannot see the
  driver's signal): trainer.fit() runs in a helper thread so that the main thread runs the job's handler at once,
  and the handler is put back after ray.init (Ray's core worker replaces it with one that logs and dies).
  Rank 0 continues the job's event cursor from state.json, and the driver takes it back afterwards (`_resync`),
  so cursors stay 1, 2, 3, ... across processes.
- Store credentials are not put in the loop config (Ray keeps it in its GCS): the workers read them from their
  own environment, which they share with the job's entrypoint (both inherit the raylet's).

Limits
- One node. Every worker reads the model, the data and the resume checkpoint from, and writes checkpoints into,
  the driver's local `out` folder: HF Trainer saves the model/optimizer from rank 0 but rng_state_{rank}.pth from
  each rank, and on resume every rank reads its own rng file from the same checkpoint folder. The workers are
  therefore pinned to the driver's node (a label selector on the node id); a run that needs more workers than the
  node holds waits. Several nodes would need `out` on a shared filesystem (NFS, ...) or each rank uploading its own
  files and materialising the checkpoint itself, and the inputs materialised on every node.
- Rank 0 uploads a checkpoint from JobCallback.on_save with no barrier before it, so in principle it can read
  another rank's rng_state_{rank}.pth before that rank finished writing it (rank 0 writes the adapter, optimizer
  and scheduler first, so in practice the others are long done); a dist.barrier() at the top of on_save closes it.
- No elastic restarts: a failed worker fails the run (FailureConfig(max_failures=0)); resubmitting the spec
  resumes from the last uploaded checkpoint, as with one worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from services.core.jobctx import JobContext
from services.core.settings import REPO_ROOT
from services.training.spec import TrainingJobSpec

STOP_FILE = ".tunery-stop"   # in `out`: the driver's SIGTERM, relayed to the workers
RAY_DIR = ".ray-train"       # in `out`: Ray Train's run storage (no checkpoints go there)
SECRET_SETTINGS = {"s3_access_key", "s3_secret_key"}


# ---------------------------------------------------------------------------------------------- setup
def worker_runtime_env() -> dict[str, Any]:
    """Run Ray's processes for this job with the job's own interpreter (the train venv) and this checkout."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # Ray Train's print patch sends every print() to its logger even while a library captures stdout (dill, inside
    # datasets' fingerprinting, disassembles functions into a captured stdout): it would flood the job's log.
    return {"py_executable": sys.executable, "env_vars": {"PYTHONPATH": path, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def _connect(runtime_env: dict[str, Any]) -> bool:
    """Join the cluster the job runs on (RAY_ADDRESS, set by Ray for a submitted job); True if we connected."""
    import ray

    if ray.is_initialized():
        return False
    # merged with the runtime_env the job was submitted with; ours wins where both name a field
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(runtime_env=runtime_env)
    if main and callable(on_sigterm):  # Ray's core worker installs its own SIGTERM handler (log, then die): put
        signal.signal(signal.SIGTERM, on_sigterm)  # back the job's (JobContext.stop_gracefully_on_sigterm)
    return True


def _loop_config(ctx: JobContext, spec: TrainingJobSpec, model_dir: Path, data_dir: Path, out: Path,
                 resume: Path | None) -> dict[str, Any]:
    return {
        "envelope": ctx.envelope.model_dump(mode="json"),
        "store": ctx.settings.model_dump(mode="json", exclude=SECRET_SETTINGS),
        "spec": spec.model_dump(mode="json"),
        "model_dir": str(model_dir), "data_dir": str(data_dir), "out": str(out),
        "resume": str(resume) if resume else None,
    }


def _trainer(ctx: JobContext, spec: TrainingJobSpec, config: dict[str, Any], out: Path, runtime_env: dict):
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = spec.worker_gpus > 0
    resources = {"CPU": spec.worker_cpus, **({"GPU": spec.worker_gpus} if gpu else {})}
    here = ray.get_runtime_context().get_node_id()
    return TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=gpu, resources_per_worker=resources,
                                     label_selector={"ray.io/node-id": here}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=f"tunery-{ctx.job_id}", storage_path=str(out / RAY_DIR),
                             worker_runtime_env=runtime_env, failure_config=FailureConfig(max_failures=0)),
    )


# ---------------------------------------------------------------------------------------------- workers
class _WorkerContext(JobContext):
    """A worker's JobContext: also stops when the driver relays a SIGTERM through `out`/STOP_FILE."""

    def __init__(self, *args, stop_file: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop_file = stop_file

    def cancel_requested(self, every_s: float = 1.0) -> str | None:
        reason = super().cancel_requested(every_s)
        if reason is None and self._stop_file.exists():
            reason = self._stop_file.read_text().strip() or "stopped"
        return reason


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs in each Ray Train worker: the job's context rebuilt from the envelope, then job.fit."""
    import ray.train

    from services.core.jobs import JobEnvelope
    from services.core.settings import StoreSettings
    from services.core.store import open_store
    from services.training.sft import fit

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    settings = StoreSettings(**config["store"])  # credentials: from this worker's environment, as for the job
    out = Path(config["out"])
    ctx = _WorkerContext(open_store(settings), JobEnvelope.model_validate(config["envelope"]), settings,
                         stop_file=out / STOP_FILE)
    spec = TrainingJobSpec.model_validate(config["spec"])
    if rank == 0:
        ctx.event(f"data-parallel run: {world} workers ({spec.strategy}, "
                  f"{'nccl' if spec.worker_gpus > 0 else 'gloo'}), {spec.worker_cpus:g} CPU"
                  + (f" + {spec.worker_gpus:g} GPU" if spec.worker_gpus > 0 else "") + " each")
    resume = Path(config["resume"]) if config["resume"] else None
    result = fit(ctx, spec, Path(config["model_dir"]), Path(config["data_dir"]), out, resume, is_main=rank == 0)
    if rank != 0:
        return None
    result["world_size"] = world
    return result


# ---------------------------------------------------------------------------------------------- run
def _run(trainer, ctx: JobContext, out: Path, every_s: float = 0.5):
    """trainer.fit() in a helper thread. The main thread stays free to run the job's SIGTERM handler at once (one
    blocked in ray.get runs it late) and relays a stop to the workers through STOP_FILE: they cannot see the
    driver's signal."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="tunery-ray-train", daemon=True)
    thread.start()
    relayed = False
    try:
        while thread.is_alive():
            thread.join(every_s)
            reason = None if relayed else ctx.cancel_requested(every_s)
            if reason is not None:
                (out / STOP_FILE).write_text(reason)
                relayed = True
    finally:
        (out / STOP_FILE).unlink(missing_ok=True)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _resync(ctx: JobContext) -> None:
    """Take over the event cursor and state.json where rank 0 left them."""
    ctx.progress = ctx.files.progress()
    ctx._cursor = ctx.progress.last_cursor


def fit_distributed(ctx: JobContext, spec: TrainingJobSpec, model_dir: Path, data_dir: Path, out: Path,
                    resume: Path | None) -> dict[str, Any]:
    """job.fit on spec.num_workers Ray Train workers: the same return value (rank 0's, plus `world_size`), and
    the adapter in out/adapter."""
    import ray

    # setup
    runtime_env = worker_runtime_env()
    connected = _connect(runtime_env)
    try:
        trainer = _trainer(ctx, spec, _loop_config(ctx, spec, model_dir, data_dir, out, resume), out, runtime_env)
        # run
        try:
            result = _run(trainer, ctx, out)
        finally:
            _resync(ctx)
    finally:
        if connected:
            ray.shutdown()
    # collect (a failed run raised out of fit(): Ray Train's WorkerGroupError names each worker's traceback)
    value = result.return_value
    if not isinstance(value, dict):
        raise TypeError(f"distributed training returned {type(value).__name__} from rank 0, not its result")
    return value
