"""Deployment records in the store (projects/<project>/deployments/<name>.json), shared by the service (reads,
the STARTING record of a new request) and the job (READY, FAILED, STOPPED). One JSON object per deployment, written
whole (the store's puts are atomic), so a reader never sees half a record."""

from __future__ import annotations

from services.core.artifacts import ArtifactStore
from services.core.deployments import record_key
from services.core.errors import NotFound
from services.serving.spec import DeploymentRecord


class DeploymentRecords:
    def __init__(self, artifacts: ArtifactStore):
        self.artifacts, self.store = artifacts, artifacts.objects
        self.prefix = record_key(artifacts, "x")[: -len("x.json")]

    def _key(self, name: str) -> str:
        return record_key(self.artifacts, name)

    def get(self, name: str) -> DeploymentRecord | None:
        try:
            return DeploymentRecord.model_validate_json(self.store.get_bytes(self._key(name)))
        except NotFound:
            return None

    def put(self, record: DeploymentRecord) -> None:
        self.store.put_bytes(self._key(record.name), record.model_dump_json().encode())

    def names(self, after: str = "") -> list[str]:
        start = self._key(after) if after else ""
        return [k[len(self.prefix):-len(".json")] for k in self.store.list(self.prefix, start)
                if k.endswith(".json") and "/" not in k[len(self.prefix):]]
