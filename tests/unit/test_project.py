"""The project's own promises: make help, the README's two commands, and CI calling the README test command."""

import re
import subprocess

from tests.servers import REPO


def test_make_help_lists_the_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed = set(re.findall(r"^\s+(?:\x1b\[\d+m)?([a-z-]+)", out, re.M))
    assert {"setup", "protos", "fixtures", "demo", "test", "bench", "up", "down", "help"} <= listed


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
