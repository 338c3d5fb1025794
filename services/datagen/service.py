"""Data service logic and settings: validate prepare requests and queue them; read reports. No grpc."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import Field

from services.core.artifacts import ArtifactRef, ArtifactStore, Manifest
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_name
from services.core.settings import ServiceSettings, port_field
from services.datagen.spec import GenerateDatasetRequest, GenerateDatasetSpec, PrepareDatasetSpec, TeacherSpec


class DatagenSettings(ServiceSettings):
    service: str = "datagen"
    port: int = port_field("datagen")
    prepare_cpus: float = Field(1.0, description="CPUs a prepare job asks Ray for")
    generate_cpus: float = Field(1.0, description="CPUs a generate job asks Ray for (add a GPU through options)")


class DatagenService:
    SERVICE = "datagen"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: DatagenSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    async def prepare(self, spec: PrepareDatasetSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("datagen.prepare", "train", lambda: self._check_prepare(spec), options,
                                      Resources(cpus=self.settings.prepare_cpus))

    async def generate(self, request: GenerateDatasetRequest, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("datagen.generate", "serve", lambda: self._check_generate(request), options,
                                      Resources(cpus=self.settings.generate_cpus))

    def _check_prepare(self, spec: PrepareDatasetSpec) -> PrepareDatasetSpec:
        data = self.artifacts.require(spec.dataset, "spec.dataset", "dataset")
        if data.metadata.get("stage") != "raw":
            raise FailedPrecondition(f"spec.dataset: {data.id} is already prepared; prepare the raw import it came from")
        model = self.artifacts.require(spec.base_model, "spec.base_model", "model")
        if not model.metadata.get("is_causal_lm", False):
            raise FailedPrecondition(f"spec.base_model: {model.id} is a {model.metadata.get('architecture')}, not a causal LM")
        if not model.metadata.get("has_chat_template"):
            raise FailedPrecondition(f"spec.base_model: {model.id} has no chat template, so chat data cannot be "
                                     "rendered as the model will see it; import a model with one")
        name = validate_name(spec.name or f"{data.name}-prepared", "spec.name")
        return spec.model_copy(update={"dataset": data.ref(), "base_model": model.ref(), "name": name})

    def _check_generate(self, r: GenerateDatasetRequest) -> GenerateDatasetSpec:
        from services.datagen.synth import load_recipe, recipe_sha256

        if not r.recipe_yaml.strip():
            raise InvalidArgument.field("spec.recipe_yaml", "is required (the recipe's YAML text)")
        if r.num_examples < 0:
            raise InvalidArgument.field("spec.num_examples", "must be ≥ 0 (0: the recipe's own)")
        recipe = load_recipe(r.recipe_yaml, {"num_examples": r.num_examples})
        t = r.teacher
        if (t.model is None) == (t.endpoint is None):
            raise InvalidArgument.field("spec.teacher", "give exactly one of a model artifact or an OpenAI endpoint")
        if t.model is not None:
            model = self.artifacts.require(t.model, "spec.teacher.model", "model")
            if not model.metadata.get("is_causal_lm", False) or not model.metadata.get("has_chat_template"):
                raise FailedPrecondition(f"spec.teacher.model: {model.id} must be a causal LM with a chat template")
            teacher = TeacherSpec(model=model.ref())
        else:
            if problem := t.endpoint.problem():
                raise InvalidArgument.field("spec.teacher.endpoint", problem)
            teacher = TeacherSpec(endpoint=t.endpoint)
        name = validate_name(r.name or f"synthetic-{recipe_sha256(recipe)[:8]}", "spec.name")
        return GenerateDatasetSpec(recipe=recipe.model_dump(), recipe_yaml=r.recipe_yaml, teacher=teacher, name=name)

    async def report(self, dataset: ArtifactRef) -> tuple[Manifest, dict[str, Any]]:
        """A prepared dataset's (or a failed prepare's report artifact's) report.json."""
        if not dataset.uri:
            raise InvalidArgument.field("dataset", "is required")
        m = await asyncio.to_thread(self.artifacts.resolve, dataset)
        if "report.json" not in {f.path for f in m.files}:
            raise FailedPrecondition(f"{m.id} has no data report (only prepared datasets and prepare reports do)")
        return m, json.loads(await asyncio.to_thread(self.artifacts.read_file, m.id, "report.json"))
