"""The e2e tests' one embedded stack: `tunery up` once per test run, on the session's Ray head and S3 server
(tests/session.py), with its own $TUNERY_HOME; `tunery down` at the end, checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO, S3_KEYS
from tests.session import require_loopback

TUNERY = str(Path(sys.executable).with_name("tunery"))
SERVICE_NAMES = ("registry", "datagen", "training", "merging", "quantization", "evaluation", "serving", "pipeline")
E2E_BUCKET = "tunery-e2e"


def tunery(env, *args, check=True, timeout=300, cwd=REPO, input=None):
    out = subprocess.run([TUNERY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                         input=input)
    if check and out.returncode != 0:
        raise AssertionError(f"tunery {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def home_env(home: Path) -> dict[str, str]:
    """The environment of a CLI user whose embedded stack lives in `home`, every service on a port the kernel picks."""
    env = {**os.environ, "TUNERY_HOME": str(home)}
    for name in SERVICE_NAMES:
        env[f"TUNERY_{name.upper()}_PORT"] = "0"  # the services report the ports they got
    env.pop("TUNERY_TOKEN", None)
    return env


@pytest.fixture(scope="session")
def cli_env(s3, ray_head, tmp_path_factory):
    """The shared stack's CLI environment: services on the session's Ray head, the store in S3 (moto stands in for
    MinIO)."""
    require_loopback("e2e tests")
    env = {**home_env(tmp_path_factory.mktemp("e2e-home")), **S3_KEYS}
    tunery(env, "up", "--ray-address", ray_head.address, "--store-url", f"s3://{E2E_BUCKET}",
           "--s3-endpoint", s3.endpoint)
    yield env
    tunery(env, "down")
    assert tunery(env, "status", check=False).returncode == 1  # down stopped it
