"""Helpers shared by bench/peer_trl.py and bench/algorithms.py: run a subprocess and measure its
wall time and peak RSS, read our scripts' metrics.jsonl, write tables as JSON and Markdown.

Standard library only, on purpose: the peak RSS of a child comes from os.wait4 (the kernel's
ru_maxrss of that child), and Linux counts in it the parent's RSS at the moment of fork/exec. A
parent that never imports torch keeps that floor at ~20 MB instead of ~400 MB.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def bench_env(threads: int) -> dict:
    """The children's environment: a fixed number of intra-op threads for every run. On a 2-core
    machine shared with other work, two OpenMP threads were up to 60x slower than one at toy scale
    (threads spin at barriers while the other is descheduled), so one is the default."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        TRL_EXPERIMENTAL_SILENCE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        TQDM_DISABLE="1",
    )
    return env


def run_measured(cmd: list, env: dict, cwd: str, log_path: str, timeout: float | None = None) -> dict:
    """Run cmd to completion; return its wall time (s), peak RSS (MiB, from wait4), exit code."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.05)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "returncode": proc.returncode, "log": log_path}


def tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def python_versions(python: str) -> dict:
    """Versions of the libraries that matter, as seen by one interpreter."""
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for p in ['torch', 'transformers', 'accelerate', 'datasets', 'trl']:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-500:]}


def code_version() -> str:
    """The commit the scripts were measured at, and whether they had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "rloo.py", "remax.py", "ppo.py", "common"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return commit + (" with uncommitted changes to the scripts" if dirty else "")


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "code": code_version(),
    }


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(xs: list) -> float:
    return statistics.median(xs) if xs else float("nan")


def update_durations(times: list) -> list:
    """Per-update durations from cumulative end times (the first update counts from 0)."""
    return [t - (times[i - 1] if i else 0.0) for i, t in enumerate(times)]


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list, rows: list) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def write_results(name: str, record: dict, markdown: str) -> tuple:
    os.makedirs(RESULTS, exist_ok=True)
    json_path, md_path = os.path.join(RESULTS, name + ".json"), os.path.join(RESULTS, name + ".md")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return json_path, md_path


def default_python(venv: str) -> str:
    path = os.path.join(ROOT, venv, "bin", "python")
    return path if os.path.exists(path) else sys.executable
