"""Data service logic and settings: validate prepare requests and queue them; read reports. No grpc."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import Field, ValidationError

from services.core.artifacts import ArtifactRef, ArtifactStore, Manifest
from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, check
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRequest, JobRunner, Resources, check_resources
from services.core.keys import validate_id, validate_name
from services.core.settings import ServiceSettings
from services.datagen.spec import GenerateDatasetSpec, OpenAIEndpointSpec, PrepareDatasetSpec, PrepareOptions, TeacherSpec


class DatagenSettings(ServiceSettings):
    service: str = "datagen"
    port: int = Field(50052, validation_alias="TUNERY_DATAGEN_PORT")
    prepare_cpus: float = Field(1.0, description="CPUs a prepare job asks Ray for")
    generate_cpus: float = Field(1.0, description="CPUs a generate job asks Ray for (add a GPU through options)")


class DatagenService:
    SERVICE = "datagen"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: DatagenSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    def _validate_prepare(self, dataset: ArtifactRef, base_model: ArtifactRef, name: str,
                          options: dict[str, Any]) -> PrepareDatasetSpec:
        try:
            opts = PrepareOptions.model_validate(options)
        except ValidationError as e:
            check([FieldViolation("spec." + ".".join(str(p) for p in err["loc"]), err["msg"]) for err in e.errors()])
        data = self.artifacts.require(dataset, "spec.dataset", "dataset")
        if data.metadata.get("stage") != "raw":
            raise FailedPrecondition(f"spec.dataset: {data.id} is already prepared; prepare the raw import it came from")
        model = self.artifacts.require(base_model, "spec.base_model", "model")
        if not model.metadata.get("is_causal_lm", False):
            raise FailedPrecondition(f"spec.base_model: {model.id} is a {model.metadata.get('architecture')}, not a causal LM")
        if not model.metadata.get("has_chat_template"):
            raise FailedPrecondition(f"spec.base_model: {model.id} has no chat template, so chat data cannot be "
                                     "rendered as the model will see it; import a model with one")
        name = validate_name(name or f"{data.name}-prepared", "spec.name")
        return PrepareDatasetSpec(dataset=data.ref(), base_model=model.ref(), name=name, options=opts)

    async def prepare(self, dataset: ArtifactRef, base_model: ArtifactRef, name: str, options: dict[str, Any],
                      key: str = "", resources: Resources | None = None,
                      labels: dict[str, str] | None = None) -> JobRecord:
        if key:
            validate_id(key, "options.idempotency_key")
        spec = await asyncio.to_thread(self._validate_prepare, dataset, base_model, name, options)
        resources = resources or Resources(cpus=self.settings.prepare_cpus)
        check_resources(resources)
        return await asyncio.to_thread(self.runner.submit, JobRequest(
            kind="datagen.prepare", service=self.SERVICE, role="train", spec=spec.model_dump(mode="json"),
            idempotency_key=key, resources=resources, labels=labels or {}))

    def _validate_generate(self, recipe_yaml: str, teacher_model: ArtifactRef | None,
                           endpoint: OpenAIEndpointSpec | None, name: str, num_examples: int) -> GenerateDatasetSpec:
        from services.datagen.synth import load_recipe, recipe_sha256

        if not recipe_yaml.strip():
            raise InvalidArgument.field("spec.recipe_yaml", "is required (the recipe's YAML text)")
        if num_examples < 0:
            raise InvalidArgument.field("spec.num_examples", "must be ≥ 0 (0: the recipe's own)")
        recipe = load_recipe(recipe_yaml, {"num_examples": num_examples})
        if (teacher_model is None) == (endpoint is None):
            raise InvalidArgument.field("spec.teacher", "give exactly one of a model artifact or an OpenAI endpoint")
        if teacher_model is not None:
            model = self.artifacts.require(teacher_model, "spec.teacher.model", "model")
            if not model.metadata.get("is_causal_lm", False) or not model.metadata.get("has_chat_template"):
                raise FailedPrecondition(f"spec.teacher.model: {model.id} must be a causal LM with a chat template")
            teacher = TeacherSpec(model=model.ref())
        else:
            if not endpoint.base_url.startswith(("http://", "https://")) or not endpoint.model:
                raise InvalidArgument.field("spec.teacher.endpoint", "needs an http(s) base_url and a model name")
            teacher = TeacherSpec(endpoint=endpoint)
        name = validate_name(name or f"synthetic-{recipe_sha256(recipe)[:8]}", "spec.name")
        return GenerateDatasetSpec(recipe=recipe.model_dump(), recipe_yaml=recipe_yaml, teacher=teacher, name=name)

    async def generate(self, recipe_yaml: str, teacher_model: ArtifactRef | None, endpoint: OpenAIEndpointSpec | None,
                       name: str = "", num_examples: int = 0, key: str = "", resources: Resources | None = None,
                       labels: dict[str, str] | None = None) -> JobRecord:
        if key:
            validate_id(key, "options.idempotency_key")
        spec = await asyncio.to_thread(self._validate_generate, recipe_yaml, teacher_model, endpoint, name, num_examples)
        resources = resources or Resources(cpus=self.settings.generate_cpus)
        check_resources(resources)
        return await asyncio.to_thread(self.runner.submit, JobRequest(
            kind="datagen.generate", service=self.SERVICE, role="serve", spec=spec.model_dump(mode="json"),
            idempotency_key=key, resources=resources, labels=labels or {}))

    async def report(self, dataset: ArtifactRef) -> tuple[Manifest, dict[str, Any]]:
        """A prepared dataset's (or a failed prepare's report artifact's) report.json."""
        if not dataset.uri:
            raise InvalidArgument.field("dataset", "is required")
        m = await asyncio.to_thread(self.artifacts.resolve, dataset)
        if "report.json" not in {f.path for f in m.files}:
            raise FailedPrecondition(f"{m.id} has no data report (only prepared datasets and prepare reports do)")
        return m, json.loads(await asyncio.to_thread(self.artifacts.read_file, m.id, "report.json"))
