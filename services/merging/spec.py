"""The merge job's typed spec (the request's domain form too). No heavy imports: the control plane builds it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.core.artifacts import ArtifactRef

OutputDtype = Literal["auto", "fp32", "bf16", "fp16"]
DEFAULT_MAX_SHARD_BYTES = 2 << 30
MIN_SHARD_BYTES = 64 << 10


class Tolerance(BaseModel):
    """How close the merged model must be to base + adapter on the probe prompts, both run in the output dtype.

    float32: the merge only reassociates float32 sums (W + s·BA computed once instead of per token), so logits
    agree to ~1e-6 (measured: 9e-7 on the tiny Llama, 1.2e-5 on the 23-shard foundation); 1e-3 leaves room for
    summation order on other hardware. bf16 / fp16: the merged weight is rounded to the output dtype once, while
    base + adapter keeps W in that dtype and adds the adapter's output on top; the difference is one rounding of each
    weight (bf16 keeps 8 significant bits: a relative 2^-9 per weight). Measured: bf16 0.006 on the tiny Llama and
    0.125 on the 4-layer foundation (mean KL 7e-7 and 4.5e-5), fp16 0.001. A deeper model accumulates more of that
    rounding, so the bounds sit 4x (logits) and 40x (KL) above the largest seen, and still far below what a wrong
    merge does: a module merged without its adapter moves logits by whole units."""

    max_abs_logit: float
    mean_kl: float


# Per output dtype, for logits computed in float32 on both sides (services.merging.equivalence): the merged
# weights differ from base + adapter only by their rounding to the output dtype. bf16 keeps 8 bits of mantissa
# (relative error up to 2^-9 per weight), fp16 11. Measured on SmolLM2-135M (30 layers) with rank-16 LoRAs in
# bf16: a trained adapter (the demo's) 0.43 / KL 3.5e-4; a 6-step one (the smoke demo's) 0.87 / KL 1.8e-3, more,
# because most of its changes are below half a bf16 step and round away coherently. A wrong merge (a missed
# scale, a dropped module) moves logits by whole units and the KL by 1e-1 and more: the bounds sit between.
TOLERANCES = {"fp32": Tolerance(max_abs_logit=1e-3, mean_kl=1e-6),
              "bf16": Tolerance(max_abs_logit=2.0, mean_kl=1e-2),
              "fp16": Tolerance(max_abs_logit=0.25, mean_kl=1.5e-3)}


class MergeSpec(BaseModel):
    """What the merge job runs; the request fills in what it gives, the service the rest (refs pinned, the dtype
    resolved, the name, the plan's estimate)."""

    base_model: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    adapter: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    output_dtype: OutputDtype = "auto"
    max_shard_bytes: int = Field(DEFAULT_MAX_SHARD_BYTES, ge=MIN_SHARD_BYTES,
                                 description="the largest output shard; a tensor larger than this gets its own")
    memory_budget_bytes: int = Field(0, ge=0, description="the most host memory the merge may use; 0: no budget")
    name: str = ""
    num_probe_prompts: int = Field(8, ge=1, le=256)
    greedy_tokens: int = Field(16, ge=1, le=256)
    # filled in by the service
    planned_peak_bytes: int = 0
    probe_dataset: ArtifactRef | None = None   # where the probe prompts come from (the adapter's training data)
