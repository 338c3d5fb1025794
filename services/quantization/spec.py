"""The quantize job's typed spec (the request's domain form too). No heavy imports: the control plane builds it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.core.artifacts import ArtifactRef

DEFAULT_SAMPLES = 256
DEFAULT_SEQ_LEN = 512


class QuantizeSpec(BaseModel):
    """What the quantize job runs; the request fills in what it gives, the service the rest (refs pinned, the
    calibration dataset found through lineage, the ignore list built from the architecture, the group size, the
    name, the memory plan)."""

    model: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    scheme: str = ""
    calibration_dataset: ArtifactRef | None = None
    num_calibration_samples: int = Field(DEFAULT_SAMPLES, ge=1, le=100_000)
    calibration_max_seq_len: int = Field(DEFAULT_SEQ_LEN, ge=16, le=131_072)
    ignore: list[str] = Field(default_factory=list, description="extra modules kept at full precision")
    group_size: int = Field(0, ge=0, le=8192, description="0: 128, or the largest of 64, 32 that divides every layer")
    name: str = ""
    memory_budget_bytes: int = Field(0, ge=0, description="refuse if the plan needs more; 0: the largest node's")
    seed: int = 0
    # filled in by the service
    resolved_ignore: list[str] = Field(default_factory=list)
    calibration_source: str = ""          # how the calibration dataset was chosen (given, or through lineage)
    resident_weight_bytes: int = 0        # weights kept in RAM; the rest is offloaded to local disk
    planned_peak_bytes: int = 0
    model_bytes: int = 0
