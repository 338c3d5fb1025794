"""A pytest plugin (tests/conftest.py loads it): each test is marked with its directory's tier (unit, integration,
e2e: `make test-unit` and the like select by marker), and under TUNERY_STRICT_SKIPS=1 (`make test`) a skip fails
the run unless its reason is one of ALLOWED_SKIPS: a broken venv, a missing package or fixture cannot pass
silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "e2e")
TESTS = Path(__file__).resolve().parent
# The only reasons a test may skip under `make test`: hardware this machine lacks.
ALLOWED_SKIPS = ("needs a GPU", "needs CUDA", "needs AVX-512")

_unexpected: list[str] = []


def _strict() -> bool:
    return os.environ.get("TUNERY_STRICT_SKIPS") == "1"


def tier_of(item) -> str:
    path = Path(str(item.fspath)).resolve()
    if path.is_relative_to(TESTS) and path.relative_to(TESTS).parts[0] in TIERS:
        return path.relative_to(TESTS).parts[0]
    return ""


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, and run the tiers in order: unit, integration, e2e (pytest's own order is
    alphabetical, e2e first): the fast tiers fail first."""
    for item in items:
        if tier := tier_of(item):
            item.add_marker(getattr(pytest.mark, tier))
    order = {t: i for i, t in enumerate(TIERS)}
    items.sort(key=lambda item: order.get(tier_of(item), len(TIERS)))  # stable: within a tier, as collected


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(ok in reason for ok in ALLOWED_SKIPS):
            _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if _unexpected and _strict():
        terminalreporter.section("skips that are not allowed (TUNERY_STRICT_SKIPS=1)", red=True)
        for line in _unexpected:
            terminalreporter.line(line)
        terminalreporter.line(f"allowed skip reasons: {', '.join(ALLOWED_SKIPS)}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected and _strict() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
