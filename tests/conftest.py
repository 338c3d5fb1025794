"""Test-run wide: the tiers and the no-silent-skips rule (tests/tiers.py), and the shared session components
(tests/session.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytest_plugins = ["tests.tiers", "tests.session", "tests.browser"]
