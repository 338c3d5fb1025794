"""The evaluation job's typed spec. No heavy imports: the control plane builds and validates it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.core.artifacts import ArtifactRef
from services.core.specs import OpenAIEndpointSpec

TargetKind = Literal["model", "adapter", "prompted", "endpoint", "deployment"]
HeldoutAssertion = Literal["exact", "contains", "regex", "json_schema", "json_fields", "similarity", "rubric"]


class TargetSpec(BaseModel):
    """What answers: a model artifact (base, merged, quantized), base + adapter on one engine, base + system
    prompt + k-shot (the prompting baseline), an external OpenAI-compatible endpoint, or a live deployment (its
    URL, key and engine controls from its record; the service fills in `endpoint`, `model` and `adapter`)."""

    kind: TargetKind
    model: ArtifactRef | None = None
    adapter: ArtifactRef | None = None
    system_prompt: str = ""
    few_shot_k: int = Field(0, ge=0, le=32)
    few_shot_dataset: ArtifactRef | None = None
    endpoint: OpenAIEndpointSpec | None = None
    deployment: str = ""                             # kind deployment: its name ...
    served_model: str = ""                           # ... and the model it serves to evaluate ("" = the base)

    @property
    def prompting(self) -> bool:
        """Whether a run sends the prompting baseline's system prompt and shots: the prompted target's only run, or
        an adapter target's third run (the base prompted, on the adapter's engine)."""
        return self.kind in ("prompted", "adapter") and bool(self.system_prompt or self.few_shot_k)


class LmEvalSpec(BaseModel):
    """lm-evaluation-harness tasks in the general block. `tasks` are what the request named (or, with task files
    and no names, every task they define); validation fills `sources` (task -> local | standard) and `hub`."""

    tasks: list[str] = Field(default_factory=list)
    task_files: ArtifactRef | None = None  # a suite artifact (format lm-eval) of local task files
    num_fewshot: int | None = Field(None, ge=0, le=64)
    limit: int = Field(0, ge=0)  # documents per task; 0: the suite's max_tests_per_block, or every document
    apply_chat_template: bool = False
    sources: dict[str, str] = Field(default_factory=dict)
    output_types: dict[str, list[str]] = Field(default_factory=dict)
    hub: bool = False  # a task needs the Hugging Face hub (standard datasets, evaluate metrics)


class SuiteSpec(BaseModel):
    promptfoo_suite: ArtifactRef | None = None      # a suite artifact holding promptfooconfig.yaml
    heldout_dataset: ArtifactRef | None = None      # target tests from its held-out split
    heldout_assertion: HeldoutAssertion = "contains"
    fact_probes: ArtifactRef | None = None          # a dataset artifact with facts.jsonl (question, answer)
    tool_calling: bool = False
    lm_eval: LmEvalSpec | None = None
    max_tests_per_block: int = Field(0, ge=0)


class SamplingSpec(BaseModel):
    """Deterministic by default: greedy, a fixed seed and a token budget."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(48, gt=0, le=8192)
    seed: int = 0


class EvalJobSpec(BaseModel):
    target: TargetSpec
    suite: SuiteSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    name: str
    # adapter targets: also evaluate the base with the adapter off, on the same engine (the controlled baseline)
    with_baseline: bool = True
