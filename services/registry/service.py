"""Registry logic: validate imports and queue them as jobs; list, get, walk and delete artifacts. No grpc."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from services.core.artifacts import KINDS, ArtifactStore, Manifest
from services.core.errors import InvalidArgument
from services.core.job_api import JobService, page_size
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_id, validate_name
from services.core.settings import ServiceSettings, port_field
from services.core.uploads import Chunk, Uploads, UploadStatus
from services.registry.sources import SourceChecks
from services.registry.spec import ImportDatasetSpec, ImportModelSpec


class RegistrySettings(ServiceSettings):
    service: str = "registry"
    port: int = port_field("registry")
    import_cpus: float = Field(1.0, description="CPUs an import job asks Ray for")
    max_upload_bytes: int = Field(0, ge=0, description="the largest file a client may upload (0: the store's limit)")
    import_url_max_bytes: int = Field(20 * 1024**3, ge=0, description="the most an https:// dataset source may "
                                      "send (0: no limit)")


class RegistryService:
    SERVICE = "registry"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: RegistrySettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)
        self.uploads = Uploads(artifacts, max_bytes=settings.max_upload_bytes)
        self.sources = SourceChecks(self.uploads, settings.roots())

    async def import_model(self, spec: ImportModelSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("registry.import_model", "control", lambda: self._check_model(spec), options,
                                      Resources(cpus=self.settings.import_cpus))

    async def import_dataset(self, spec: ImportDatasetSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("registry.import_dataset", "control", lambda: self._check_dataset(spec),
                                      options, Resources(cpus=self.settings.import_cpus))

    def _check_model(self, spec: ImportModelSpec) -> ImportModelSpec:
        validate_name(spec.name, "spec.name")
        self.sources.model(spec.source, spec.allow_trust_remote_code)
        return spec

    def _check_dataset(self, spec: ImportDatasetSpec) -> ImportDatasetSpec:
        validate_name(spec.name, "spec.name")
        self.sources.dataset(spec.source)
        return spec.model_copy(update={"url_max_bytes": self.settings.import_url_max_bytes})

    # ------------------------------------------------------------------ uploads
    async def stat_upload(self, sha256: str, size: int) -> UploadStatus:
        return await asyncio.to_thread(self.uploads.status, sha256, size)

    async def upload(self, chunks: AsyncIterator[Chunk]) -> UploadStatus:
        return await self.uploads.receive(chunks)

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
