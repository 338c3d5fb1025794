"""Headless Chromium for the page tests: Debian's /usr/bin/chromium (make setup-browser) driven by Playwright's
Python client; Playwright never downloads a browser. A browser per test (~0.5 s): Playwright's sync API runs an
event loop in the main thread while it is open, which would break every later test that calls asyncio.run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("TUNERY_CHROMIUM", "/usr/bin/chromium"))
# the flags a closed network needs (no background connections, no update or sync checks at every start)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup-browser` installs Chromium (or set TUNERY_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.js_errors = errors
    yield pg
    context.close()
