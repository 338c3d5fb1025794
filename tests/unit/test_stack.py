"""The embedded stack's local state (services/cli/stack.py) without starting it."""

from __future__ import annotations

import os

import pytest

from services.cli.stack import ray_temp_dir

pytestmark = pytest.mark.unit


def test_each_home_gets_its_own_ray_temp_dir(tmp_path):
    """Two stacks of one user (two $TUNERY_HOMEs, e.g. the e2e tests beside the demo) never share a Ray session
    folder; one home always finds the same one; the path stays short (Ray's unix sockets live below it)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert ray_temp_dir(a) != ray_temp_dir(b)
    assert ray_temp_dir(a) == ray_temp_dir(tmp_path / "b" / ".." / "a")
    assert ray_temp_dir(a).name.startswith(f"tunery-ray-{os.getuid()}-") and len(str(ray_temp_dir(a))) <= 30
