"""The data jobs' typed specs. No heavy imports: the control plane reads these too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.core.artifacts import ArtifactRef
from services.core.specs import OpenAIEndpointSpec

FormatName = Literal["auto", "alpaca", "chat", "sharegpt", "completion", "preference"]
# What a prepare job needs of the base model: its tokenizer and chat template, never the weights.
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "generation_config.json", "added_tokens.json")


class PrepareOptions(BaseModel):
    """The prepare step's options: the job spec's and the library's (services.datagen.prepare) one definition."""

    format: FormatName = "auto"
    holdout_fraction: float = Field(0.1, ge=0.0, le=0.5)
    seed: int = 0
    dedup: Literal["none", "exact", "near"] = "near"
    dedup_action: Literal["drop", "flag"] = "drop"
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)
    keep_empty_replies: bool = False  # an example whose assistant reply is empty teaches silence: dropped by default
    max_tokens: int = Field(0, ge=0)
    drop_too_long: bool = False
    min_examples: int = Field(1, ge=1)
    stratify_field: str = ""
    max_reported_problems: int = Field(50, ge=1, le=10_000)
    max_line_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="a longer line is an error, never parsed")


class PrepareDatasetSpec(BaseModel):
    """The request and, with its references pinned and its name filled in, the job's spec."""

    dataset: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    base_model: ArtifactRef = Field(default_factory=ArtifactRef.unset)
    name: str = ""
    options: PrepareOptions = Field(default_factory=PrepareOptions)


class TeacherSpec(BaseModel):
    """Exactly one of: a model artifact run by vLLM inside the job, or an OpenAI-compatible endpoint."""

    model: ArtifactRef | None = None
    endpoint: OpenAIEndpointSpec | None = None


class GenerateDatasetRequest(BaseModel):
    recipe_yaml: str = ""             # the recipe's YAML text
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    name: str = ""
    num_examples: int = 0             # 0: the recipe's own


class GenerateDatasetSpec(BaseModel):
    recipe: dict                      # a validated services.datagen.synth.Recipe, as data
    recipe_yaml: str                  # the text the user gave, stored with the artifact
    teacher: TeacherSpec
    name: str
