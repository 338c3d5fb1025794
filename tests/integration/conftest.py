"""Session-wide real dependencies (one S3 server, one Ray head) and a fresh project prefix per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from services.registry.service import RegistrySettings
from services.registry.servicer import build as build_registry
from services.sdk.client import TuneryClient
from tests.servers import REPO, S3_KEYS, RayHead, S3Server, ServerThread, in_loopback_namespace

TOKEN = "integration-test-token"
BUCKET = "tunery-it"


@pytest.fixture(scope="session")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_head(s3):
    if not in_loopback_namespace() and os.environ.get("TUNERY_NETNS") != "0":
        pytest.fail("integration tests start a Ray head, which binds every interface: run them through "
                    "`make test` (a loopback-only network namespace), or set TUNERY_NETNS=0 to run here anyway")
    head = RayHead({**S3_KEYS, "TUNERY_S3_ENDPOINT": s3.endpoint})
    print(f"\nRay head started in {head.start_s:.2f}s")
    yield head
    head.stop()


@pytest.fixture
def project() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(s3, ray_head, project, tmp_path) -> RegistrySettings:
    return RegistrySettings(
        project=project, store_url=f"s3://{BUCKET}", s3_endpoint=s3.endpoint, s3_access_key=S3_KEYS["TUNERY_S3_ACCESS_KEY"],
        s3_secret_key=S3_KEYS["TUNERY_S3_SECRET_KEY"], ray_address=ray_head.address, auth_tokens=TOKEN,
        host="127.0.0.1", port=0, cache_dir=tmp_path / "cache")


@pytest.fixture
def servers():
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture
def registry(servers, settings):
    """(client, port) for a real registry gRPC server on 127.0.0.1:0 bound to this test's project."""
    port = servers.start(settings, build_registry)
    client = TuneryClient(f"127.0.0.1:{port}", TOKEN)
    from tests.servers import wait_for
    from services.cli.stack import health

    wait_for(lambda: health(port) == "SERVING", 30, what="registry SERVING")
    yield client
    client.close()


def service_client(servers, settings, *services: str, **overrides: dict) -> TuneryClient:
    """A client of real servers bound to this test's project: the registry plus `services` (names as in the
    embedded stack), each on 127.0.0.1:0 with its own settings class; `overrides` per service, e.g.
    training={"cpus_per_worker": 0.5}."""
    from services.cli.stack import health
    from services.embedded.__main__ import SERVICES
    from tests.servers import wait_for

    known = {cls.model_fields["service"].default: (cls, build) for cls, build in SERVICES}
    base = settings.model_dump()
    ports = {"registry": servers.start(settings, build_registry)}
    for name in services:
        cls, build = known[name]
        ports[name] = servers.start(cls(**{**base, "service": name, "port": 0, **overrides.get(name, {})}), build)
    for port in ports.values():
        wait_for(lambda: health(port) == "SERVING", 30, what="SERVING")
    return TuneryClient(f"127.0.0.1:{ports['registry']}", TOKEN,
                        endpoints={k: f"127.0.0.1:{p}" for k, p in ports.items()})


@pytest.fixture
def data_client(servers, settings):
    """A client of real registry and datagen servers bound to this test's project."""
    c = service_client(servers, settings, "datagen")
    yield c
    c.close()


def fixture_model(name: str) -> Path:
    path = Path(os.environ.get("TUNERY_FIXTURES", REPO / "build" / "fixtures")) / name
    if not (path / "config.json").exists():
        pytest.fail(f"{path} is missing: build the fixtures with `make fixtures` (make test does it)")
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return fixture_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_moe() -> Path:
    return fixture_model("tiny-moe")
