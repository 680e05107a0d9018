"""The README's pointers into the code stay true, and its test command is the one CI runs."""

import os
import re

from conftest import ROOT


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_line_pointers_point_at_the_quoted_code():
    pointers = re.findall(r"\[([\w/.]+)#L(\d+)\]\([\w/.]+#L\d+\) `([^`]+)`", _read("README.md"))
    assert len(pointers) >= 10
    for path, line, snippet in pointers:
        lines = _read(path).splitlines()
        where = [i + 1 for i, text in enumerate(lines) if snippet in text]
        assert snippet in lines[int(line) - 1], f"README points at {path}#L{line} for `{snippet}`; it is at {where}"


def test_ci_runs_the_readme_test_command():
    readme, ci = _read("README.md"), _read(".ci/run")
    assert 'pip install torch==2.13.0 -e ".[test]"' in readme and 'pip install -q torch==2.13.0 -e ".[test]"' in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
