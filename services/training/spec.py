"""The training job's typed spec. No heavy imports: the control plane builds and validates it."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from services.core.artifacts import ArtifactRef

Method = Literal["lora", "qlora", "dora"]
METHODS: tuple[str, ...] = ("lora", "qlora", "dora")
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]

# The highest learning rate the service accepts for an adapter: LoRA runs use 1e-5 .. 1e-3; 1e-2 already
# diverges on most bases, anything above is a typo (2e-1 for 2e-4).
MAX_LEARNING_RATE = 1e-2


class LoraSpec(BaseModel):
    rank: int = Field(16, gt=0, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=list, description="resolved short module names")
    preset: Literal["", "attention", "all-linear"] = Field("", description="a request's module preset; the service "
                                                            "resolves it into target_modules and clears it")
    use_rslora: bool = False

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"must be > 0 (got {v}); 8-64 is usual")
        return v


class QLoraSpec(BaseModel):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Precision = "auto"


class OptimizerSpec(BaseModel):
    learning_rate: float = Field(2e-4, gt=0.0, le=MAX_LEARNING_RATE)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: str = "adamw_torch"
    max_grad_norm: float = Field(1.0, ge=0.0)

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _learning_rate(cls, v):
        if isinstance(v, (int, float)) and not 0 < v <= MAX_LEARNING_RATE:
            raise ValueError(f"must be in (0, {MAX_LEARNING_RATE:g}] (got {v:g}); LoRA usually trains at 1e-4 to 3e-4")
        return v


class TrackingSpec(BaseModel):
    backend: Literal["", "wandb", "mlflow"] = ""
    project: str = ""
    uri: str = ""


class TrainingJobSpec(BaseModel):
    """What the training job runs. `run_key` names the run's checkpoints: the same spec submitted again (a retry
    after a crash or a cancel) resumes from its latest checkpoint."""

    base_model: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    dataset: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    name: str = Field("", description="default <base>-<method>")
    method: Method = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    qlora: QLoraSpec = Field(default_factory=QLoraSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(0, ge=0, description="overrides epochs when > 0")
    micro_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_len: int = Field(512, gt=0)
    gradient_checkpointing: bool = False
    packing: bool = False
    seed: int = 0
    eval_every_steps: int = Field(0, ge=0, description="0: once per epoch")
    eval_samples: int = Field(64, ge=0, description="held-out examples in the periodic eval loss (0: none)")
    checkpoint_every_steps: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    num_workers: int = Field(1, gt=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Precision = "auto"
    device: Device = "auto"
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    fresh_start: bool = Field(False, description="ignore earlier checkpoints of this spec; keep this run's apart")
    # Filled in by the service from its plan: what each Ray Train worker asks for, and the estimate.
    worker_cpus: float = Field(1.0, gt=0)
    worker_gpus: float = Field(0.0, ge=0)
    planned_peak_gib: float = 0.0

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v):
        if v not in METHODS:
            raise ValueError(f"{v!r} is not one of {', '.join(METHODS)}")
        return v

    # Fields that change how a run is carried out or reported, not what it computes.
    OPERATIONAL: ClassVar[set[str]] = {"name", "tracking", "keep_checkpoints", "checkpoint_every_steps", "fresh_start",
                                       "worker_cpus", "worker_gpus", "planned_peak_gib"}

    def run_key(self) -> str:
        """Hash of everything that determines the run's result."""
        body = self.model_dump(mode="json", exclude=self.OPERATIONAL)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def checkpoint_name(self, job_id: str) -> str:
        """Where the run's checkpoints live: shared by every submission of this spec (so a re-submission resumes),
        or this job's own with fresh_start."""
        if self.fresh_start:
            return f"ckpt-{self.run_key()}-{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"
        return f"ckpt-{self.run_key()}"
