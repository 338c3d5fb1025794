"""Registry logic: validate imports and queue them as jobs; list, get, walk and delete artifacts. No grpc."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import Field

from services.core.artifacts import KINDS, ArtifactStore, Manifest
from services.core.errors import InvalidArgument
from services.core.hostpaths import host_path
from services.core.job_api import JobService, page_size
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_id, validate_name
from services.core.modeldir import quick_check
from services.core.settings import ServiceSettings, port_field
from services.registry.spec import DATASET_SUFFIXES, ImportDatasetSpec, ImportModelSpec

HUB_PREFIX = "hf://"


class RegistrySettings(ServiceSettings):
    service: str = "registry"
    port: int = port_field("registry")
    import_cpus: float = Field(1.0, description="CPUs an import job asks Ray for")


class RegistryService:
    SERVICE = "registry"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: RegistrySettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    async def import_model(self, spec: ImportModelSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("registry.import_model", "control", lambda: self._check_model(spec), options,
                                      Resources(cpus=self.settings.import_cpus))

    async def import_dataset(self, spec: ImportDatasetSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("registry.import_dataset", "control", lambda: self._check_dataset(spec),
                                      options, Resources(cpus=self.settings.import_cpus))

    @staticmethod
    def _check_model(spec: ImportModelSpec) -> ImportModelSpec:
        validate_name(spec.name, "spec.name")
        if spec.source.startswith(HUB_PREFIX):
            if not spec.source[len(HUB_PREFIX):].count("/") == 1:
                raise InvalidArgument.field("spec.source", f"{spec.source!r}: use hf://<org>/<name>")
        else:
            quick_check(spec.source, spec.allow_trust_remote_code)
        return spec

    @staticmethod
    def _check_dataset(spec: ImportDatasetSpec) -> ImportDatasetSpec:
        validate_name(spec.name, "spec.name")
        path = host_path(spec.source, "spec.source")
        if not path.is_file():
            raise InvalidArgument.field("spec.source", f"{spec.source} is not a regular file")
        if path.suffix.lower() not in DATASET_SUFFIXES:
            raise InvalidArgument.field("spec.source", f"{path.name}: use one of {', '.join(DATASET_SUFFIXES)}")
        if path.stat().st_size == 0:
            raise InvalidArgument.field("spec.source", f"{path.name} is empty")
        return spec

    async def list(self, kind: str, name: str, size: int, after: str) -> tuple[list[Manifest], str]:
        if kind and kind not in KINDS:
            raise InvalidArgument.field("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
        if name:
            validate_name(name, "name")
        if after:
            validate_id(after, "page_token")
        return await asyncio.to_thread(self.artifacts.list, kind, name, after=after, limit=page_size(size))

    async def get(self, id_or_uri: str) -> Manifest:
        return await asyncio.to_thread(self.artifacts.get, self._required(id_or_uri))

    async def lineage(self, id_or_uri: str, max_depth: int) -> list[Manifest]:
        if max_depth < 0:
            raise InvalidArgument.field("max_depth", "must be ≥ 0")
        return await asyncio.to_thread(self.artifacts.lineage, self._required(id_or_uri), max_depth)

    async def delete(self, id_or_uri: str) -> Manifest:
        return await asyncio.to_thread(self.artifacts.delete, self._required(id_or_uri))

    async def download(self, id_or_uri: str, path: str, chunk: int = 1 << 20):
        """(entry, chunks) of one file, verified against its sha256 before anything is yielded."""
        import tempfile

        from services.core.artifacts import sha256_file
        from services.core.errors import IntegrityError

        if not path:
            raise InvalidArgument.field("path", "is required (a file of the artifact)")
        m = await self.get(id_or_uri)
        entry = m.file(path)
        with tempfile.TemporaryDirectory(prefix="tunery-dl-") as tmp:
            local = Path(tmp) / "blob"
            await asyncio.to_thread(self.artifacts.objects.get_file, self.artifacts.blob_key(entry.sha256), local)
            if await asyncio.to_thread(sha256_file, local) != entry.sha256:
                raise IntegrityError(f"{m.id}/{path}: the stored blob does not match its sha256")
            with open(local, "rb") as f:
                offset = 0
                while data := f.read(chunk):
                    yield entry, offset, data
                    offset += len(data)

    @staticmethod
    def _required(id_or_uri: str) -> str:
        if not id_or_uri:
            raise InvalidArgument.field("id", "is required (an artifact id or tunery:// uri)")
        return id_or_uri
