"""Peer comparison: our rloo.py and ppo.py against TRL's RLOO trainer and TRL's PPO trainer
(trl 1.12, the last release with PPO, under trl.experimental.ppo), on the same local models.

Same policy (the toy task's warmed-up 130k-parameter Llama), same reward model (a tiny Llama
regressed onto the sorting rule, bench/assets.py), same prompts, K, completions per update,
response length, temperature, learning rate and schedule, KL coefficient and number of updates;
fp32 on CPU; no evaluation, no checkpoints. Each run is a subprocess (ours through its real CLI,
TRL's through bench/trl_driver.py), the four kinds alternate in every round (and the order flips
between rounds) so that a change of machine load hits all of them. Reported per run: wall time per
episode of the training loop and of the whole process, the median time of one update after the
first, peak RSS (os.wait4), and the reward curve.

    .venv-bench/bin/python bench/peer_trl.py                      # ~8 min on 2 shared cores
    .venv-bench/bin/python bench/peer_trl.py --updates 20 --repeats 1   # a quick look

Writes bench/results/peer_trl.json and bench/results/peer_trl.md.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from measure import (
    RESULTS,
    ROOT,
    bench_env,
    default_python,
    machine,
    markdown_table,
    median,
    python_versions,
    read_metrics,
    run_measured,
    tail,
    text_table,
    update_durations,
    write_results,
)

UNMATCHED = [
    "Sampling streams: both seed 1, but TRL and we draw prompts and samples in a different order, so curves differ "
    "by sampling noise.",
    "RLOO reward reading: TRL decodes the completion (EOS dropped), re-tokenizes prompt+text and reads the reward "
    "model at the last letter; we read it at the EOS. The reward model is fitted to give the rule's score at both "
    "places (bench/assets.py), so the two agree to its fit.",
    "PPO rollout log-probs: TRL takes them from generate's scores (and keeps the (B, T, V) scores); we recompute them "
    "with a forward pass (one more policy forward per update in ours, so that the first ratio is exactly 1).",
    "PPO gradient clipping: TRL's PPO loop never clips; ours is run with --max-grad-norm 1e9 to match. RLOO: both "
    "clip at 1.0.",
    "Optimizer: TRL uses the Trainer's default AdamW (adamw_torch_fused); ours uses torch.optim.AdamW (unfused on "
    "CPU). Same lr, betas, eps, no decay.",
    "TRL's PPO calls gc.collect() and empty_cache() twice per update; TRL's RLOO computes the entropy in the training "
    "forward, ours in the rollout forward.",
    "KL metric: TRL's RLOO logs the per-token mean KL, ours and TRL's PPO the per-sequence sum (only the logs differ; "
    "the penalty is the same).",
    "PPO reward placement: TRL's PPO adds the score one position after the EOS (a padding slot whose value it also "
    "trains), so GAE discounts it by one more lambda; ours adds it at the EOS.",
    "TRL's PPO adds 1e-7 to the temperature.",
]


def ours_cmd(a, algo, assets, outdir) -> list:
    cmd = [
        a.ours_python,
        os.path.join(ROOT, f"{algo}.py"),
        "--model",
        assets["policy"],
        "--reward-model",
        assets["reward_model"],
        "--dataset",
        assets["prompts"],
        "--output-dir",
        outdir,
        "--total-episodes",
        str(a.updates * a.batch_size),
        "--local-micro-batch-size",
        str(a.batch_size),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--temperature",
        str(a.temperature),
        "--learning-rate",
        str(a.learning_rate),
        "--kl-coef",
        str(a.kl_coef),
        "--seed",
        str(a.seed),
        "--print-samples-every",
        "0",
    ]
    if algo == "rloo":
        cmd += ["--num-generations", str(a.k), "--max-grad-norm", "1.0"]
    else:
        cmd += ["--num-epochs", str(a.num_epochs), "--max-grad-norm", "1e9"]  # TRL's PPO does not clip
    return cmd


def trl_cmd(a, algo, assets, outdir, out_json) -> list:
    return [
        a.trl_python,
        os.path.join(ROOT, "bench", "trl_driver.py"),
        "--algo",
        algo,
        "--model",
        assets["policy"],
        "--reward-model",
        assets["reward_model"],
        "--dataset",
        assets["prompts"],
        "--output-dir",
        outdir,
        "--out",
        out_json,
        "--k",
        str(a.k),
        "--batch-size",
        str(a.batch_size),
        "--updates",
        str(a.updates),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--temperature",
        str(a.temperature),
        "--learning-rate",
        str(a.learning_rate),
        "--kl-coef",
        str(a.kl_coef),
        "--max-grad-norm",
        "1.0",
        "--num-epochs",
        str(a.num_epochs),
        "--seed",
        str(a.seed),
    ]


def one_run(a, impl, algo, assets, scratch, env, index) -> dict:
    """One subprocess; returns its measurements and per-update records."""
    run_dir = os.path.join(scratch, f"{index:02d}-{impl}-{algo}")
    os.makedirs(run_dir)
    outdir, out_json, log = (
        os.path.join(run_dir, "out"),
        os.path.join(run_dir, "trl.json"),
        os.path.join(run_dir, "log.txt"),
    )
    cmd = ours_cmd(a, algo, assets, outdir) if impl == "ours" else trl_cmd(a, algo, assets, outdir, out_json)
    print(f"[{index}] {impl} {algo} ...", end=" ", flush=True)
    res = run_measured(cmd, env, cwd=run_dir, log_path=log, timeout=a.timeout)
    if res["returncode"] != 0:
        print("FAILED")
        raise RuntimeError(f"{impl} {algo} exited with {res['returncode']}:\n{tail(log)}")
    episodes = a.updates * a.batch_size
    if impl == "ours":
        metrics = [m for m in read_metrics(os.path.join(outdir, "metrics.jsonl")) if m["update"] > 0]
        times = [m["time/elapsed"] for m in metrics]  # the script's clock: its loop started at 0
        scores, kls = [m["objective/scores"] for m in metrics], [m["objective/kl"] for m in metrics]
    else:
        with open(out_json) as f:
            rec = json.load(f)
        times = [u["time"] for u in rec["updates"]]
        scores, kls = [u["score"] for u in rec["updates"]], [u["kl"] for u in rec["updates"]]
    if len(times) != a.updates:
        raise RuntimeError(f"{impl} {algo}: {len(times)} updates logged, expected {a.updates}")
    durations = update_durations(times)
    run = {
        "impl": impl,
        "algo": algo,
        "index": index,
        "cmd": cmd,
        **res,
        "train_s": times[-1],
        "train_s_per_episode": times[-1] / episodes,
        "process_s_per_episode": res["wall_s"] / episodes,
        "steady_update_s": median(durations[1:]),
        "first_update_s": durations[0],
        "scores": scores,
        "kl": kls,
        "update_end_s": times,
    }
    train_ms = 1e3 * run["train_s_per_episode"]
    print(f"{res['wall_s']:.1f} s, train {train_ms:.2f} ms/episode, peak RSS {res['peak_rss_mib']:.0f} MiB")
    if not a.keep:
        shutil.rmtree(outdir, ignore_errors=True)
    return run


def window_means(xs: list, width: int) -> list:
    return [round(statistics.fmean(xs[i : i + width]), 3) for i in range(0, len(xs), width)]


def summarise(runs: list, a) -> dict:
    summary = {}
    for algo in ("rloo", "ppo"):
        for impl in ("ours", "trl"):
            rs = [r for r in runs if r["impl"] == impl and r["algo"] == algo]
            if not rs:
                continue
            n = len(rs[0]["scores"])
            curve = [statistics.fmean(r["scores"][i] for r in rs) for i in range(n)]
            w = min(10, n)
            summary[f"{impl}_{algo}"] = {
                "runs": len(rs),
                "train_ms_per_episode": median([1e3 * r["train_s_per_episode"] for r in rs]),
                "process_ms_per_episode": median([1e3 * r["process_s_per_episode"] for r in rs]),
                "steady_update_ms": median([1e3 * r["steady_update_s"] for r in rs]),
                "first_update_ms": median([1e3 * r["first_update_s"] for r in rs]),
                "peak_rss_mib": median([r["peak_rss_mib"] for r in rs]),
                "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs),
                "all_train_ms_per_episode": [round(1e3 * r["train_s_per_episode"], 3) for r in rs],
                "score_first": statistics.fmean(curve[:w]),
                "score_last": statistics.fmean(curve[-w:]),
                "score_curve_mean_over_runs": [round(s, 4) for s in curve],
                "score_windows": window_means(curve, max(1, n // 10)),
            }
        if f"ours_{algo}" in summary and f"trl_{algo}" in summary:
            o, t = summary[f"ours_{algo}"], summary[f"trl_{algo}"]
            summary[f"ratio_{algo}"] = {
                "train_time_per_episode": o["train_ms_per_episode"] / t["train_ms_per_episode"],
                "process_time_per_episode": o["process_ms_per_episode"] / t["process_ms_per_episode"],
                "steady_update": o["steady_update_ms"] / t["steady_update_ms"],
                "peak_rss": o["peak_rss_mib"] / t["peak_rss_mib"],
            }
    return summary


def fmt_versions(v: dict) -> str:
    return ", ".join(f"{k} {x}" for k, x in v.items())


def render(record: dict) -> tuple:
    a, s = record["config"], record["summary"]
    header = [
        "run",
        "train ms/episode",
        "whole process ms/episode",
        "ms/update (median, after 1st)",
        "1st update ms",
        "peak RSS MiB",
        "score, first 10 updates",
        "score, last 10 updates",
    ]
    rows = []
    for algo in ("rloo", "ppo"):
        for impl in ("ours", "trl"):
            key = f"{impl}_{algo}"
            if key not in s:
                continue
            r = s[key]
            name = f"{'ours' if impl == 'ours' else 'TRL'} {algo.upper()}" + (f" ({algo}.py)" if impl == "ours" else "")
            rows.append(
                [
                    name,
                    f"{r['train_ms_per_episode']:.3f}",
                    f"{r['process_ms_per_episode']:.3f}",
                    f"{r['steady_update_ms']:.1f}",
                    f"{r['first_update_ms']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['score_first']:.3f}",
                    f"{r['score_last']:.3f}",
                ]
            )
    ratio_rows = []
    for algo in ("rloo", "ppo"):
        if f"ratio_{algo}" in s:
            q = s[f"ratio_{algo}"]
            met = "met" if q["train_time_per_episode"] <= 0.7 else "NOT met"
            ratio_rows.append(
                [
                    algo.upper(),
                    f"{q['train_time_per_episode']:.2f}x",
                    f"{q['process_time_per_episode']:.2f}x",
                    f"{q['steady_update']:.2f}x",
                    f"{q['peak_rss']:.2f}x",
                    f"<= 0.7x: {met}",
                ]
            )
    ratio_header = [
        "ours / TRL",
        "train time per episode",
        "whole process per episode",
        "ms per update",
        "peak RSS",
        "target",
    ]
    curve_rows = []
    for algo in ("rloo", "ppo"):
        for impl in ("ours", "trl"):
            key = f"{impl}_{algo}"
            if key in s:
                curve_rows.append([f"{impl} {algo}"] + [f"{x:.2f}" for x in s[key]["score_windows"]])
    width = max((len(r) - 1 for r in curve_rows), default=0)
    step = max(1, a["updates"] // 10)
    curve_header = ["mean score, updates"] + [
        f"{i * step + 1}-{min((i + 1) * step, a['updates'])}" for i in range(width)
    ]
    m = record["machine"]
    md = [
        "# Peer comparison with TRL (bench/peer_trl.py)",
        "",
        f"Machine: {m['cpu_cores']} CPU cores (shared with other work; load average {m['loadavg_at_start']} at "
        f"start), fp32, {a['threads']} intra-op thread(s) per run, runs under nice 10. {m['date']}, code at "
        f"{m.get('code', '?')}.",
        f"Libraries: {fmt_versions(record['versions']['trl'])}"
        + (
            " (both sides, one interpreter)."
            if record["config"]["ours_python"] == record["config"]["trl_python"]
            else f"; ours: {fmt_versions(record['versions']['ours'])}."
        ),
        "",
        f"Workload: toy policy {a['policy_params']:,} parameters, reward model of the same size fitted to the "
        f"sorting rule (held-out correlation {record['assets']['reward_model_fit']['heldout_corr_with_rule']}); "
        f"{a['batch_size']} completions per update (RLOO: {a['batch_size'] // a['k']} prompts x K={a['k']}; PPO: "
        f"{a['batch_size']} prompts x 1, {a['num_epochs']} epochs, 1 minibatch), max {a['max_new_tokens']} new "
        f"tokens, temperature {a['temperature']}, lr {a['learning_rate']} linear to 0, beta {a['kl_coef']}, "
        f"{a['updates']} updates, {a['repeats']} run(s) of each, alternating. Medians over runs.",
        "",
        markdown_table(header, rows),
        "",
        markdown_table(ratio_header, ratio_rows),
        "",
        '"train" is the training loop (first update to last, as each trainer\'s clock sees it); "whole process" adds '
        "start-up, model loading and saving. Scores are reward-model scores of the sampled completions (the raw "
        "reward, without the KL term).",
        "",
        markdown_table(curve_header, curve_rows),
        "",
        "Settings that could not be matched:",
        "",
        *[f"- {u}" for u in UNMATCHED],
    ]
    text = "\n\n".join(
        [text_table(header, rows), text_table(ratio_header, ratio_rows), text_table(curve_header, curve_rows)]
    )
    return "\n".join(md), text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2, help="rounds; each round runs all four, alternating")
    p.add_argument("--batch-size", type=int, default=64, help="completions per update")
    p.add_argument("--k", type=int, default=4, help="RLOO samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every run")
    p.add_argument("--algos", default="rloo,ppo")
    p.add_argument(
        "--ours-python",
        default=default_python(".venv-bench"),
        help="interpreter for rloo.py/ppo.py; default: the bench venv, so both sides load the very same library files "
        "(the project's .venv has the same versions; RSS counts resident library pages, which differ between copies)",
    )
    p.add_argument(
        "--trl-python", default=default_python(".venv-bench"), help="interpreter with trl 1.12 (the bench venv)"
    )
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench", ".work"), help="models and prompts are cached here")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--keep", action="store_true", help="keep the runs' output directories")
    p.add_argument("--render-only", action="store_true", help="re-write the tables from bench/results/peer_trl.json")
    p.add_argument("--no-nice", action="store_true", help="do not lower the priority (default: nice 10)")
    a = p.parse_args()
    if a.render_only:
        with open(os.path.join(RESULTS, "peer_trl.json")) as f:
            record = json.load(f)
        record["unmatched"] = UNMATCHED
        md, text = render(record)
        print(text)
        write_results("peer_trl", record, md)
        return
    if not a.no_nice:
        os.nice(10)  # the children inherit it
    algos = a.algos.split(",")
    machine_info = machine()  # the load average before our runs

    env = bench_env(a.threads)
    workdir = os.path.abspath(a.workdir)
    res = subprocess.run(
        [a.ours_python, os.path.join(ROOT, "bench", "assets.py"), "toy", workdir],
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        sys.exit(f"building the toy assets failed:\n{res.stderr[-3000:]}")
    assets = json.loads(res.stdout.strip().splitlines()[-1])
    with open(os.path.join(assets["policy"], "config.json")) as f:
        cfg = json.load(f)
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    policy_params = n * (4 * h * h + 3 * h * i + 2 * h) + h + v * h * (1 if cfg.get("tie_word_embeddings") else 2)

    versions = {"ours": python_versions(a.ours_python), "trl": python_versions(a.trl_python)}
    if "trl" not in versions["trl"]:
        sys.exit(f"{a.trl_python} has no trl: pip install -e '.[bench]' into the bench venv (bench/README.md)")
    print(f"ours: {a.ours_python} {versions['ours']}\nTRL:  {a.trl_python} {versions['trl']}")

    scratch = tempfile.mkdtemp(prefix="peer_trl-")
    kinds = [(impl, algo) for algo in algos for impl in ("ours", "trl")]
    runs, index = [], 0
    try:
        for rnd in range(a.repeats):
            order = kinds if rnd % 2 == 0 else [k for pair in zip(kinds[1::2], kinds[0::2]) for k in pair]
            for impl, algo in order:
                runs.append({"round": rnd, **one_run(a, impl, algo, assets, scratch, env, index)})
                index += 1
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    config = {**{k: v for k, v in vars(a).items() if k not in ("workdir",)}, "policy_params": policy_params}
    record = {
        "machine": machine_info,
        "versions": versions,
        "config": config,
        "assets": assets,
        "unmatched": UNMATCHED,
        "summary": summarise(runs, a),
        "runs": runs,
    }
    md, text = render(record)
    print("\n" + text)
    paths = write_results("peer_trl", record, md)
    print("\nwrote " + " and ".join(os.path.relpath(x, ROOT) for x in paths))


if __name__ == "__main__":
    main()
