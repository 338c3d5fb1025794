"""Where a deployment's record lives in the store (projects/<project>/deployments/<name>.json), for the serving
service that writes it (services.serving.records, typed) and the services that read it as a target (evaluation's
`deployment` target reads the URL, the key and the engine's controls)."""

from __future__ import annotations

import json
from typing import Any

from services.core.artifacts import ArtifactStore
from services.core.errors import NotFound

PREFIX = "deployments"


def record_key(artifacts: ArtifactStore, name: str) -> str:
    return f"{artifacts.key(PREFIX)}/{name}.json"


def read_record(artifacts: ArtifactStore, name: str) -> dict[str, Any] | None:
    """The record as stored (services.serving.spec.DeploymentRecord's fields), or None."""
    try:
        return json.loads(artifacts.objects.get_bytes(record_key(artifacts, name)))
    except NotFound:
        return None
