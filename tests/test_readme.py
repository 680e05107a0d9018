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
    extras = '-e ".[test,lora]"'
    assert f"pip install torch==2.13.0 {extras}" in readme and f"pip install -q torch==2.13.0 {extras}" in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci


def test_twin_table_matches_the_measured_diffs():
    from test_twins import BUDGETS, changed_lines

    readme = _read("README.md")
    for (a, b), budget in BUDGETS.items():
        row = re.search(rf"\| `{re.escape(a)}` <-> `{re.escape(b)}` \| (\d+) \| (\d+) \|", readme)
        assert row, f"README has no row for {a} <-> {b}"
        assert (int(row.group(1)), int(row.group(2))) == (changed_lines(a, b), budget)


def test_no_placeholders_left():
    """Every figure in the README comes from a run: no template placeholder survives."""
    allowed = {
        "ACCELERATE_USE_CPU",
        "ONEFILE_RLHF_CACHE",
        "FULL_STATE_DICT",
        "HF_HUB_OFFLINE",
        "OMP_NUM_THREADS",
        "INVALID_LOGPROB",
        "SLURM_JOB_NODELIST",
        "SLURM_NNODES",
        "SLURM_NODEID",
        "VLLM_CPU_KVCACHE_SPACE",
        "MALLOC_MMAP_THRESHOLD_",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
    }
    tokens = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", _read("README.md")))
    assert tokens <= allowed, tokens - allowed


def test_every_common_name_the_scripts_import_is_in_the_readme_table():
    """The README lists, per script, which common/ names it uses and what each does."""
    readme = _read("README.md")
    table = readme[readme.index("### What the scripts use from `common/`") :]
    table = table[: table.index("\n### ")]
    for script in ["rloo.py", "remax.py", "ppo.py", "grpo.py"]:
        for module, names in re.findall(r"^from (common\.\w+) import (.+)$", _read(script), re.M):
            for name in names.split(","):
                row = re.search(rf"^\| [^|]*`{re.escape(module)}\.{name.strip()}`[^|]* \| ([^|]+) \|", table, re.M)
                assert row, f"{script} imports {module}.{name.strip()}; the README's table has no row for it"
                users = row.group(1).strip()
                assert users == "all" or script[:-3] in users, f"{module}.{name.strip()}: {users} misses {script}"
