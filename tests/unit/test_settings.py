import subprocess
import sys

from services.core.settings import REPO_ROOT, RaySettings, StoreSettings
from services.embedded.__main__ import SERVICES
from services.registry.service import RegistrySettings


def test_env_vars(monkeypatch):
    monkeypatch.setenv("TUNERY_PROJECT", "team-a")
    monkeypatch.setenv("TUNERY_STORE_URL", "s3://models")
    monkeypatch.setenv("TUNERY_REGISTRY_PORT", "6001")
    monkeypatch.setenv("TUNERY_AUTH_TOKENS", "a, b,")
    s = RegistrySettings()
    assert (s.project, s.store_url, s.port, s.tokens()) == ("team-a", "s3://models", 6001, {"a", "b"})
    assert s.job_env()["TUNERY_STORE_URL"] == "s3://models"
    assert "TUNERY_S3_SECRET_KEY" not in s.job_env()  # credentials never travel in job specs


def test_every_service_has_its_own_settings_and_port():
    ports = {cls().service: cls().port for cls, _ in SERVICES}
    assert len(ports) == 8 and len(set(ports.values())) == 8
    assert ports["registry"] == 50051 and ports["pipeline"] == 50058


def test_worker_python_per_role(monkeypatch):
    monkeypatch.setenv("TUNERY_WORKER_PYTHON_TRAIN", "/opt/venv/bin/python")
    r = RaySettings()
    assert r.python_for("train") == "/opt/venv/bin/python"
    assert r.python_for("control") == sys.executable
    local = REPO_ROOT / ".venvs" / "quantize" / "bin" / "python"
    assert r.python_for("quantize") == (str(local) if local.exists() else sys.executable)


def test_bad_project_is_refused():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        StoreSettings(project="../other")


def test_control_plane_never_imports_torch():
    code = ("import sys, services.embedded.__main__, services.cli.main, services.registry.job, services.sdk.client; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.split() == ["False", "False"]
