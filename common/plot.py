"""Reward curves as a picture: score, KL, RLHF reward and held-out score of one or more runs, against
episodes and against wall time (the runs' own time/elapsed), one line per run, named by algorithm.

    python -m common.plot output/rloo__1__1700000000 output/ppo__1__1700000000 -o curves.png
    python -m common.plot runs_a/metrics.jsonl runs_b/metrics.jsonl --smooth 20 --title "TL;DR" -o curves.png

Reads metrics.jsonl (a run's output directory or the file itself); needs matplotlib, the `plot`
extra: pip install -e ".[plot]".
"""

import argparse
import json
import os
import sys

PANELS = [  # (metric, axis label)
    ("objective/scores", "score (sampled)"),
    ("objective/kl", "KL to the reference"),
    ("objective/rlhf_reward", "score - beta * KL"),
    ("eval/scores", "held-out score (greedy)"),
]


def read_run(path: str) -> tuple:
    """(label, metrics lines) of a run directory or a metrics.jsonl file. The label is the run's
    algorithm (finished.json, or a checkpoint's state.json), else its name up to the first "__"."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"{path}: no metrics.jsonl (give a run's --output-dir or its metrics.jsonl)")
    with open(file) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    label = os.path.basename(os.path.normpath(folder)).split("__")[0]
    checkpoints = os.path.join(folder, "checkpoints")
    states = [os.path.join(folder, "finished.json")] + (
        [os.path.join(checkpoints, c, "state.json") for c in sorted(os.listdir(checkpoints))]
        if os.path.isdir(checkpoints)
        else []
    )
    for state in states:
        if os.path.isfile(state):
            with open(state) as f:
                label = json.load(f).get("algorithm", label)
            break
    return label, lines


def smooth(values: list, window: int) -> list:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def seconds(line: dict) -> float | None:
    """Wall seconds since the run began: time/elapsed, or for older runs episode / episodes per second."""
    if "time/elapsed" in line:
        return line["time/elapsed"]
    if line.get("time/episodes_per_second"):
        return line["episode"] / line["time/episodes_per_second"]
    return None


def plot(runs: list, out: str, window: int = 10, title: str | None = None) -> None:
    """runs: [(label, metrics lines)] -> a PNG at `out`, about 900 pixels wide."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('common.plot needs matplotlib: pip install matplotlib (or pip install -e ".[plot]")') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    longest = max((seconds(m) or 0.0 for _, lines in runs for m in lines), default=0.0)
    unit, scale = ("h", 3600) if longest > 3 * 3600 else ("min", 60) if longest > 300 else ("s", 1)
    fig, axes = plt.subplots(len(PANELS), 2, figsize=(9, 2.3 * len(PANELS) + 0.9), sharex="col", squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, lines) in enumerate(runs):
        color = colors[i % len(colors)]
        for row, (key, name) in enumerate(PANELS):
            points = [m for m in lines if key in m]
            if not points:
                continue
            ys = [m[key] for m in points]
            if not key.startswith("eval/"):
                ys = smooth(ys, window)
            xs_episode = [m["episode"] for m in points]
            xs_time = [(seconds(m) or float("nan")) / scale for m in points]
            style = dict(color=color, lw=1.6, marker="o" if key.startswith("eval/") else None, ms=3.5)
            axes[row][0].plot(xs_episode, ys, label=label if row == 0 else None, **style)
            axes[row][1].plot(xs_time, ys, **style)
            axes[row][0].set_ylabel(name)
    for row in range(len(PANELS)):
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    axes[-1][0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))
    axes[-1][0].set_xlabel("episodes (responses sampled)")
    axes[-1][1].set_xlabel(f"wall time ({unit})")
    axes[0][0].set_title("against episodes", fontsize=10)
    axes[0][1].set_title("against wall time", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False, fontsize=10)
    note = f"training curves: mean of the last {window} updates" if window > 1 else "training curves: per update"
    fig.suptitle(f"{title + ' - ' if title else ''}{note}; held-out score: every evaluation", y=0.962, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run output directories or metrics.jsonl files")
    p.add_argument("-o", "--out", default="curves.png", help="the PNG to write")
    p.add_argument("--smooth", type=int, default=10, help="trailing mean over this many updates (1: none)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    runs = [read_run(path) for path in a.runs]
    labels = [label for label, _ in runs]
    runs = [  # two runs of one algorithm: tell them apart by folder
        (f"{label} ({os.path.basename(os.path.normpath(path))})" if labels.count(label) > 1 else label, lines)
        for (label, lines), path in zip(runs, a.runs)
    ]
    plot(runs, a.out, max(1, a.smooth), a.title)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
