"""The suite's own rules (tests/tiers.py), run on a throwaway test file by a real pytest: under `make test`
(TUNERY_STRICT_SKIPS=1) a skip fails the run unless its reason is an allowed one; elsewhere a skip is a skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.servers import REPO

SKIPPING = '''
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("{reason}")
'''


def run(tmp_path, reason: str, strict: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_x.py").write_text(SKIPPING.format(reason=reason))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNERY_STRICT_SKIPS": "1" if strict else "0"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.tiers", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("reason", ["no serve venv (make setup-serve)", "needs lm-eval (No module named 'lm_eval')"])
def test_an_unexpected_skip_fails_the_strict_run(tmp_path, reason):
    strict = run(tmp_path, reason, strict=True)
    assert strict.returncode == pytest.ExitCode.TESTS_FAILED, strict.stdout
    assert "skips that are not allowed" in strict.stdout and reason in strict.stdout
    assert run(tmp_path, reason, strict=False).returncode == pytest.ExitCode.OK


def test_a_skip_for_missing_hardware_is_allowed(tmp_path):
    out = run(tmp_path, "needs a GPU (no CUDA device here)", strict=True)
    assert out.returncode == pytest.ExitCode.OK and "1 passed, 1 skipped" in out.stdout, out.stdout


def test_every_test_carries_its_tier(request):
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("integration") is None
