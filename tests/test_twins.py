"""The algorithm files are twins: same sections in the same order, and small diffs.

Budgets were calibrated on the first complete versions (rloo<->remax 175 changed lines, rloo<->ppo
226, about 40 of each in the module docstrings), raised once to 185 and 232, and lowered to 140 and
200 when run management moved to common/run.py (issue 11). Raising one is a decision to write down
in the commit message, not a fix for a failing test."""

import os
import re
import subprocess

import pytest

from conftest import ROOT

FILES = ["rloo.py", "remax.py", "ppo.py", "grpo.py"]
BUDGETS = {("rloo.py", "remax.py"): 140, ("rloo.py", "ppo.py"): 202, ("rloo.py", "grpo.py"): 120}
MAX_LINES = {"rloo.py": (380, 190), "remax.py": (390, 190), "ppo.py": (440, 200), "grpo.py": (415, 200)}  # (file, main)
SECTIONS = [
    '"""',
    "\nimport ",
    "\n@dataclass\nclass Args:",
    "    # Model\n",
    "    # Data\n",
    "    # Generation\n",
    "    # Algorithm\n",
    "    # Optimization\n",
    "    # Batch sizes\n",
    "    # Run: output, logging, checkpoints\n",
    "    # Filled in at runtime\n",
    "\n# ---- Algorithm ----\n",
    "\ndef main(args: Args) -> dict:",
    "        # 1. Rollout\n",
    "        # 2. Score\n",
    "        # 3. Log-probs\n",
    "        # 4. KL-shaped rewards\n",
    "        # 5. Advantages\n",
    "        # 6. Update\n",
    "        # 7. Log\n",
    '\nif __name__ == "__main__":\n    main(tyro.cli(Args))\n',
]


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def changed_lines(a: str, b: str) -> int:
    """`diff a b | grep -c '^[<>]'`, the number the README quotes (difflib aligns differently)."""
    out = subprocess.run(["diff", a, b], capture_output=True, text=True, cwd=ROOT).stdout
    return sum(1 for line in out.splitlines() if line[:1] in "<>")


@pytest.mark.parametrize("name", FILES)
def test_sections_in_order(name):
    text, position = _read(name), 0
    for header in SECTIONS:
        found = text.find(header, position)
        assert found >= 0, f"{name}: {header.strip()!r} missing or out of order"
        position = found + 1


@pytest.mark.parametrize("name", FILES)
def test_module_docstring_is_short_and_names_its_twin(name):
    docstring = re.match(r'"""(.*?)"""', _read(name), re.S).group(1)
    assert len(docstring.splitlines()) <= 25
    assert "arXiv" in docstring and "Differences from" in docstring
    assert f"python {name}" in docstring and "accelerate launch" in docstring


@pytest.mark.parametrize("pair", list(BUDGETS))
def test_diff_within_budget(pair):
    n = changed_lines(*pair)
    assert n <= BUDGETS[pair], f"{pair[0]} <-> {pair[1]}: {n} changed lines, budget {BUDGETS[pair]}"


def test_no_algorithm_leftovers():
    """Metrics and knobs an algorithm does not have must not leak in by copy-paste."""
    rloo, remax, ppo, grpo = _read("rloo.py"), _read("remax.py"), _read("ppo.py"), _read("grpo.py")
    for text in (rloo, remax, grpo):
        assert "loss/value" not in text and "vf_coef" not in text and "value_model" not in text
    assert "policy/clipfrac" not in remax and "cliprange" not in remax  # ReMax clips nothing
    assert "num_generations" not in remax and "num_generations" not in ppo
    assert "baseline_scores" not in rloo and "baseline_scores" not in ppo and "baseline_scores" not in grpo
    assert "zero_std_groups" not in rloo and "kl_estimator" not in grpo  # GRPO's KL is k3 in the loss


@pytest.mark.parametrize("name", FILES)
def test_files_and_main_stay_short(name):
    import ast

    tree = ast.parse(_read(name))
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    max_file, max_main = MAX_LINES[name]
    assert len(_read(name).splitlines()) <= max_file
    assert main.end_lineno - main.lineno + 1 <= max_main


@pytest.mark.parametrize("name", FILES)
def test_help_shows_the_algorithm_on_the_first_screen(name):
    """--help lists model, data and generation first, then the algorithm's own knobs, within 50 lines."""
    import sys

    out = subprocess.run([sys.executable, name, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "--kl-coef" in line)
    assert first < 50, f"--kl-coef is on line {first} of --help"
    run_flags = next(i for i, line in enumerate(lines) if "--output-dir" in line)
    assert run_flags > first  # run management comes after the algorithm
