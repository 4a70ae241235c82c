"""The code stays clean: ruff (lint and format) and mypy, as configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pvelab.core.paths import ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_clean(cmd):
    tool = BIN / cmd[0] if (BIN / cmd[0]).exists() else shutil.which(cmd[0])
    assert tool, f"{cmd[0]} not installed: run scripts/setup"
    res = subprocess.run([str(tool), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
