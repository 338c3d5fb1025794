"""Training service logic and settings: validate a fine-tuning request, plan its memory, queue it. No grpc.

Everything a user can get wrong is refused here, before anything is queued: a dataset that is not prepared or
lacks a train split, a base that is not a causal LM, target modules the architecture lacks, rank or learning
rate out of range, sequences longer than the model's context, QLoRA where bitsandbytes cannot run, a job too
big for the cluster's GPUs (with what to change).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from services.core.artifacts import ArtifactStore, Manifest
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_name
from services.core.settings import ServiceSettings, port_field
from services.training import planner, targets
from services.training.spec import TrainingJobSpec

# GiB per GPU by Ray's accelerator_type, for clusters whose settings do not state it (the larger variant).
ACCELERATOR_GIB = {"H200": 141.0, "H100": 80.0, "A100": 80.0, "L40S": 48.0, "A6000": 48.0, "L4": 24.0,
                   "A10G": 24.0, "RTX4090": 24.0, "V100": 32.0, "T4": 16.0}


class TrainingSettings(ServiceSettings):
    service: str = "training"
    port: int = port_field("training")
    gpu_memory_gib: float = Field(0.0, ge=0, description="memory of each cluster GPU; 0: from Ray's "
                                  "accelerator_type, else the planner cannot check GPU jobs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs a training worker asks Ray for")
    bitsandbytes_devices: str = Field("cpu,cuda", description="devices the train image's bitsandbytes runs 4-bit "
                                      "on (QLoRA); bitsandbytes 0.50 has CPU and CUDA backends")
    headroom: float = Field(0.9, gt=0, le=1, description="fraction of a GPU's memory a plan may use")


@dataclass
class Plan:
    estimate: planner.MemoryEstimate
    fit: planner.Fit
    resources: Resources
    spec: TrainingJobSpec
    notes: list[str] = field(default_factory=list)


class TrainingService:
    SERVICE = "training"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: TrainingSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    # ------------------------------------------------------------------ validation
    def _validate(self, spec: TrainingJobSpec) -> tuple[TrainingJobSpec, Manifest, dict[str, Any]]:
        model = self.artifacts.require(spec.base_model, "spec.base_model", "model")
        data = self.artifacts.require(spec.dataset, "spec.dataset", "dataset")
        spec = spec.model_copy(update={"base_model": model.ref(), "dataset": data.ref(),
                                       "name": validate_name(spec.name or f"{model.name}-{spec.method}", "spec.name")})
        md = model.metadata
        if not md.get("is_causal_lm", False):
            arch = md.get("architecture") or "model of unknown architecture"
            raise FailedPrecondition(f"spec.base_model: {model.id} is a {arch}, not a causal LM; fine-tuning needs "
                                     "a *ForCausalLM base")
        if md.get("form") == "quantized" or md.get("quantization"):
            raise FailedPrecondition(f"spec.base_model: {model.id} is already quantized; train on the full-precision "
                                     "base (QLoRA quantizes it on load)")
        if data.metadata.get("stage") != "prepared":
            raise FailedPrecondition(f"spec.dataset: {data.id} is a raw import, not a prepared dataset; run "
                                     "`tunery data prepare` (PrepareDataset) on it first")
        if "train.jsonl" not in {f.path for f in data.files} or not data.metadata.get("num_train"):
            raise FailedPrecondition(f"spec.dataset: {data.id} has no train split (train.jsonl); prepare it again")
        context = int(md.get("max_position_embeddings") or 0)
        if context and spec.max_seq_len > context:
            raise InvalidArgument.field("spec.max_seq_len", f"{spec.max_seq_len} is longer than the model's context "
                                        f"of {context} tokens; use ≤ {context}")
        available = md.get("linear_modules")
        if available is None:  # imported before the registry recorded them: the job checks against the model
            names = spec.lora.target_modules
        else:
            names = targets.resolve(spec.lora.preset, spec.lora.target_modules, available)
        spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"target_modules": names, "preset": ""})})
        if spec.method == "qlora":
            devices = {d.strip() for d in self.settings.bitsandbytes_devices.split(",") if d.strip()}
            want = spec.device if spec.device != "auto" else ("cuda" if self._gpus() else "cpu")
            if want not in devices:
                raise FailedPrecondition(f"spec.method: QLoRA needs bitsandbytes 4-bit on {want}, which this "
                                         f"cluster's train environment does not support (it runs on "
                                         f"{', '.join(sorted(devices)) or 'nothing'}); use method lora or dora")
        if spec.device == "cuda" and not self._gpus():
            raise FailedPrecondition("spec.device: cuda was asked for but the cluster has no GPU; use auto or cpu")
        config = json.loads(self.artifacts.read_file(model.id, "config.json"))
        return spec, model, config

    # ------------------------------------------------------------------ planning
    def _gpus(self) -> list[float]:
        """Memory (GiB) of each GPU on the cluster's largest-GPU node, as far as it can be known."""
        best: list[float] = []
        for node in self.runner.nodes():
            n = int(node.get("GPU", 0))
            if not n:
                continue
            gib = self.settings.gpu_memory_gib
            if not gib:
                kinds = [k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:")]
                gib = max((ACCELERATOR_GIB.get(k, 0.0) for k in kinds), default=0.0)
            if gib and (not best or gib > best[0] or (gib == best[0] and n > len(best))):
                best = [gib] * n
            elif not gib and not best:
                best = [0.0] * n  # GPUs of unknown size
        return best

    def _plan(self, spec: TrainingJobSpec) -> Plan:
        spec, model, config = self._validate(spec)
        gpus = self._gpus()
        precision = spec.precision if spec.precision != "auto" else ("bf16" if gpus else "fp32")
        est = planner.estimate(
            config, method=spec.method, rank=spec.lora.rank,
            target_modules=spec.lora.target_modules or targets.resolve("all-linear", [], list(
                planner.linear_modules(planner.ModelShape.from_config(config)))),
            micro_batch_size=spec.micro_batch_size, max_seq_len=spec.max_seq_len,
            gradient_checkpointing=spec.gradient_checkpointing, precision=precision,
            optimizer=spec.optimizer.optimizer, num_workers=spec.num_workers, strategy=spec.strategy,
            total_parameters=int(model.metadata.get("parameters") or 0) or None)
        notes = []
        known = [g for g in gpus if g > 0]
        if gpus and not known:
            notes.append("the cluster's GPUs report no memory size (set TUNERY_TRAINING_GPU_MEMORY_GIB); not checked")
        use_gpu = spec.device != "cpu" and bool(gpus)
        fit = planner.check_fit(est, gpu_memory_gib=known if use_gpu else [], method=spec.method,
                                rank=spec.lora.rank, max_seq_len=spec.max_seq_len,
                                gradient_checkpointing=spec.gradient_checkpointing, headroom=self.settings.headroom)
        if fit.feasible and use_gpu and spec.num_workers > len(gpus):
            fit = planner.Fit(False, f"asks for {spec.num_workers} workers with a GPU each; the largest node has "
                              f"{len(gpus)} GPUs", ["fewer workers"], 0)
        per_worker_gpu = 1.0 if use_gpu else 0.0
        if fit.feasible and spec.num_workers > 1:
            fit = self._cpu_fit(spec.num_workers) or fit
        if spec.num_workers > 1:  # the driver only coordinates; Ray Train's workers hold the resources
            resources = Resources(cpus=0.5)
        else:
            resources = Resources(cpus=self.settings.cpus_per_worker, gpus=per_worker_gpu)
        return Plan(est, fit, resources, spec, notes)

    DRIVER_CPUS = 0.5  # a multi-worker job's driver; its workers are placed on the driver's node

    def _cpu_fit(self, num_workers: int) -> planner.Fit | None:
        """Ray Train waits forever for workers it cannot place: refuse a job whose driver and workers do not fit
        the CPUs of the largest node (they are placed together). None when it fits or the cluster is unknown."""
        largest = max((float(n.get("CPU", 0.0)) for n in self.runner.nodes()), default=0.0)
        need = self.DRIVER_CPUS + num_workers * self.settings.cpus_per_worker
        if not largest or need <= largest + 1e-9:
            return None
        most = int((largest - self.DRIVER_CPUS) // self.settings.cpus_per_worker)
        return planner.Fit(False, f"asks for {num_workers} workers × {self.settings.cpus_per_worker:g} CPU + "
                           f"{self.DRIVER_CPUS:g} for the driver on one node ({need:g} CPUs); the largest node has "
                           f"{largest:g} CPUs", [f"at most {most} workers", "a larger node",
                                                 "TUNERY_TRAINING_CPUS_PER_WORKER"], 0)

    async def plan(self, spec: TrainingJobSpec) -> Plan:
        return await asyncio.to_thread(self._plan, spec)

    # ------------------------------------------------------------------ submit
    async def submit(self, spec: TrainingJobSpec, options: SubmitOptions) -> JobRecord:
        plans: list[Plan] = []

        def validate() -> TrainingJobSpec:
            plans.append(plan := self._plan(spec))
            if not plan.fit.feasible:
                raise FailedPrecondition(plan.fit.reason)
            return plan.spec.model_copy(update={
                "planned_peak_gib": round(plan.estimate.peak_gib, 3), "worker_cpus": self.settings.cpus_per_worker,
                "worker_gpus": 1.0 if plan.fit.num_gpus else 0.0})

        return await self.jobs.submit("training.sft", "train", validate, options, lambda _: plans[0].resources)
