"""Per-test servers over the session's S3 server and Ray head (tests/session.py): a fresh project per test for the
tests that need a clean one (the registry's, the data service's); the seeded project (`seed`) for the rest."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.registry.service import RegistrySettings
from services.registry.servicer import build as build_registry
from services.sdk.client import TuneryClient
from tests.servers import ServerThread, wait_for
from tests.session import TOKEN, fixture_model, service_client, service_settings


@pytest.fixture
def project() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(s3, ray_head, project, tmp_path) -> RegistrySettings:
    return service_settings(s3, ray_head, project, tmp_path / "cache")


@pytest.fixture
def servers():
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture
def registry(servers, settings):
    """A client of a real registry gRPC server on 127.0.0.1:0 bound to this test's project."""
    from services.cli.stack import health

    port = servers.start(settings, build_registry)
    client = TuneryClient(f"127.0.0.1:{port}", TOKEN)
    wait_for(lambda: health(port) == "SERVING", 30, what="registry SERVING")
    yield client
    client.close()


@pytest.fixture
def data_client(servers, settings):
    """A client of real registry and datagen servers bound to this test's project."""
    c = service_client(servers, settings, "datagen")
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return fixture_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_moe() -> Path:
    return fixture_model("tiny-moe")
