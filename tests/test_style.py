"""The code passes the formatter and linter configured in pyproject.toml (ruff)."""

import subprocess
import sys

import pytest

from tests import helpers


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
  result = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "."],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, (
    f"`ruff {' '.join(command)} .` failed; run `ruff format . && ruff check --fix .`:\n"
    f"{result.stdout}{result.stderr}"
  )
