"""The code is formatted and linted with ruff (settings in pyproject.toml, line length 120)."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff(command):
    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e '.[test]'")
    out = subprocess.run([sys.executable, "-m", "ruff", *command, "."], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
