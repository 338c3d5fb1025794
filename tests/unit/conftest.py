"""The unit tier's servers read request paths from pytest's temporary folders: those are their import roots (the
roots' own behaviour is tests/unit/test_hostpaths.py)."""

from __future__ import annotations

import pytest

from tests.session import IMPORT_ROOTS


@pytest.fixture(autouse=True)
def import_roots(monkeypatch):
    monkeypatch.setenv("TUNERY_IMPORT_ROOTS", IMPORT_ROOTS)
