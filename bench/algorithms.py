"""Memory and time of the four algorithms at >= 100M parameters: ppo.py, remax.py, rloo.py and grpo.py
on one random-weight Llama (hidden 768, 12 layers, a 32000-id vocabulary: 162M parameters; the
reward and value models are the same network with a scalar head, 138M), a few updates each, fp32
on CPU, beside what the models alone should take (PPO holds four models and trains two; the others
hold three and train one).

Each script runs unchanged through its command line in its own subprocess. Peak RSS comes from
os.wait4; the time of each phase of an update (generation, scoring, log-prob forwards, the update)
and the token rates are the scripts' own time/* metrics in metrics.jsonl. Then two micro-checks
(bench/micro_checks.py): what the log-prob computation keeps for backward beside the logits, and
one AdamW step over the policy's parameters, per-tensor loop against foreach and fused.

    .venv/bin/python bench/algorithms.py              # ~8 min on 2 shared cores
    .venv/bin/python bench/algorithms.py --tiny       # a 2-layer model, 2 updates, no checks: a smoke test (~1 min)

Writes bench/results/algorithms.json and bench/results/algorithms.md (--tiny writes nothing).
"""

import argparse
import json
import os
import shutil
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
    python_versions,
    read_metrics,
    run_measured,
    tail,
    text_table,
    write_results,
)

HELD_TRAINED = {"ppo": (4, 2), "remax": (3, 1), "rloo": (3, 1), "grpo": (3, 1)}
PHASES = ("rollout", "score", "logprobs", "update")  # the scripts' time/<phase> metrics


def script_cmd(a, script, assets, outdir) -> list:
    cmd = [
        a.python, os.path.join(ROOT, f"{script}.py"),
        "--model", assets["policy"], "--reward-model", assets["reward_model"], "--dataset", assets["prompts"],
        "--output-dir", outdir, "--total-episodes", str(a.updates * a.batch_size),
        "--local-micro-batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
        "--learning-rate", "1e-6", "--seed", "1", "--print-samples-every", "0",
    ]  # fmt: skip
    if script in ("rloo", "grpo"):
        cmd += ["--num-generations", str(a.k)]
    return cmd


def theory_mib(script: str, P: int, R: int) -> float:
    """fp32 bytes of the models' weights, gradients and the two AdamW moments: the policy and the
    reference have P parameters, the reward and value models R (no LM head)."""
    if script == "ppo":  # policy, reference, reward, value; policy and value trained (grad + 2 moments)
        n = 2 * P + 2 * R + 3 * (P + R)
    else:  # policy, reference, reward; policy trained
        n = 2 * P + R + 3 * P
    return 4 * n / 2**20


def summarise_run(script: str, metrics: list, res: dict, rss_after_imports: float, assets: dict) -> dict:
    """Means over the updates after the first (which warms up) of the run's time/* metrics."""
    updates = [m for m in metrics if m["update"] > 0]
    steady = updates[1:] if len(updates) > 1 else updates
    step = sum(sum(m[f"time/{p}"] for p in PHASES) for m in steady)
    phase = {p: sum(m[f"time/{p}"] for m in steady) for p in PHASES}
    generated = sum(m["time/generated_tokens_per_second"] * m["time/rollout"] for m in steady)
    trained = sum(m["time/trained_tokens_per_second"] * m["time/update"] for m in steady)
    held, trained_models = HELD_TRAINED[script]
    return {
        "models_held": held,
        "models_trained": trained_models,
        "peak_rss_mib": res["peak_rss_mib"],
        "rss_after_imports_mib": rss_after_imports,
        "peak_above_imports_mib": res["peak_rss_mib"] - rss_after_imports,
        "theory_model_state_mib": theory_mib(script, assets["policy_params"], assets["reward_model_params"]),
        "s_per_update": step / len(steady),
        "s_per_episode": step / len(steady) / (updates[0]["episode"]),
        "first_update_s": sum(updates[0][f"time/{p}"] for p in PHASES),
        "process_s": res["wall_s"],
        "generated_tokens_per_s": generated / phase["rollout"],
        "train_tokens_per_s": trained / phase["update"],
        "mean_response_length": sum(m["val/response_length"] for m in steady) / len(steady),
        **{f"{p}_share": phase[p] / step for p in PHASES},
    }


def render(record: dict) -> tuple:
    a, s, assets, m = record["config"], record["summary"], record["assets"], record["machine"]
    mem_header = ["script", "models held / trained", "peak RSS MiB", "RSS after imports", "peak above imports",
                  "theory: weights+grads+AdamW MiB", "above imports / theory"]  # fmt: skip
    time_header = ["script", "s / update", "ms / episode", "generated tok/s", "training tok/s", "generation share",
                   "score share", "log-probs share", "update share"]  # fmt: skip
    mem_rows, time_rows = [], []
    for script in a["scripts"]:
        if script not in s:
            continue
        r = s[script]
        mem_rows.append([
            f"{script}.py", f"{r['models_held']} / {r['models_trained']}", f"{r['peak_rss_mib']:.0f}",
            f"{r['rss_after_imports_mib']:.0f}", f"{r['peak_above_imports_mib']:.0f}",
            f"{r['theory_model_state_mib']:.0f}", f"{r['peak_above_imports_mib'] / r['theory_model_state_mib']:.2f}",
        ])  # fmt: skip
        time_rows.append([
            f"{script}.py", f"{r['s_per_update']:.2f}", f"{1e3 * r['s_per_episode']:.0f}",
            f"{r['generated_tokens_per_s']:.0f}", f"{r['train_tokens_per_s']:.0f}",
            *(f"{100 * r[f'{p}_share']:.0f}%" for p in PHASES),
        ])  # fmt: skip
    ratio_rows = []
    for other in ("rloo", "remax", "grpo"):
        if "ppo" in s and other in s:
            q = s["ppo"]["peak_rss_mib"] / s[other]["peak_rss_mib"]
            q2 = s["ppo"]["peak_above_imports_mib"] / s[other]["peak_above_imports_mib"]
            qt = s["ppo"]["theory_model_state_mib"] / s[other]["theory_model_state_mib"]
            met = "met" if q >= 1.6 else "NOT met"
            ratio_rows.append([f"ppo / {other}", f"{q:.2f}x", f"{q2:.2f}x", f"{qt:.2f}x", f">= 1.6x: {met}"])
    ratio_header = ["peak memory", "peak RSS", "peak above imports", "theory (model state)", "target (peak RSS)"]
    lengths = ", ".join(f"{k} {v['mean_response_length']:.1f}" for k, v in s.items())
    md = [
        "# The algorithms at >= 100M parameters (bench/algorithms.py)",
        "",
        f"Machine: {m['cpu_cores']} CPU cores (shared with other work; load average {m['loadavg_at_start']} at "
        f"start), fp32, {a['threads']} intra-op thread(s), nice 10. {m['date']}, code at {m.get('code', '?')}. "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + ".",
        "",
        f"Models: random-weight Llama {assets['key']}: policy and reference {assets['policy_params'] / 1e6:.1f}M "
        f"parameters, reward model (and PPO's value model, a trainable copy of it) "
        f"{assets['reward_model_params'] / 1e6:.1f}M. {a['batch_size']} sampled responses per update (RLOO, GRPO: "
        f"{a['batch_size'] // a['k']} prompts x K={a['k']}; ReMax: {a['batch_size']} prompts, plus "
        f"{a['batch_size']} greedy; PPO: {a['batch_size']} prompts, 4 epochs), one micro-batch, at most "
        f"{a['max_new_tokens']} new tokens (mean response length: {lengths}), {a['updates']} updates; times are "
        f"means over updates 2..{a['updates']}. Learning rate 1e-6.",
        "",
        markdown_table(mem_header, mem_rows),
        "",
        "Theory: 4 bytes x (weights of every model held + gradient and two AdamW moments of every model trained); "
        'the reward and value models have no LM head, so they are smaller than the policy. "RSS after imports" is '
        "the peak RSS of a process that only imports the script and the libraries a run loads; the "
        "models are loaded after that, memory-mapped from safetensors and paged in on first use. The rest above "
        "theory is activations, logits, the KV cache and allocator slack.",
        "",
        markdown_table(ratio_header, ratio_rows),
        "",
        markdown_table(time_header, time_rows),
        "",
        "From each run's metrics.jsonl (time/*): s / update is the sum of the four phases of an update (rollout: "
        "generation and EOS truncation; score; log-probs: the no-grad forwards of the policy, reference and "
        "value model; update: the advantages, forward, backward and optimizer steps), the shares are theirs. "
        "Generated tok/s: sampled response tokens per second of the rollout phase (ReMax also generates a greedy "
        "response per prompt in that time, not counted). Training tok/s: prompt and response tokens through the "
        "training forward and backward per second of the update phase, every epoch counted.",
    ]
    text = [text_table(mem_header, mem_rows), text_table(ratio_header, ratio_rows), text_table(time_header, time_rows)]
    checks = record.get("checks")
    if checks:
        ls_header = ["log-probs of (B, T, V) logits", "logits MiB", "kept for backward beside the logits MiB",
                     "RSS peak above start MiB", "s (fwd+bwd)"]  # fmt: skip
        ls_rows = [
            [f"{c['variant']} (temperature {c['temperature']})", f"{c['logits_mib']:.0f}",
             f"{c['extra_saved_for_backward_mib']:.0f}", f"{c['rss_peak_above_start_mib']:.0f}", f"{c['seconds']:.2f}"]
            for c in checks["logsoftmax"]
        ]  # fmt: skip
        c0, ad = checks["logsoftmax"][0], checks["adam"]
        adam_header = ["AdamW step", f"s per step, {ad['params'] / 1e6:.0f}M fp32 parameters"]
        adam_rows = [
            ["per-tensor loop (torch's default on CPU)", f"{ad['default_s']:.3f}"],
            ["foreach=True", f"{ad['foreach_s']:.3f}"],
            ["fused=True (the scripts)", f"{ad['fused_s']:.3f}"],
        ]
        md += [
            "",
            f"Log-prob memory, B={c0['B']}, T={c0['T']}, V={c0['V']} fp32 logits from a linear layer (fresh process "
            'per row): "ours" is common.ops.selective_log_softmax, "naive" is log_softmax(logits / t).gather.',
            "",
            markdown_table(ls_header, ls_rows),
            "",
            markdown_table(adam_header, adam_rows),
        ]
        text += [text_table(ls_header, ls_rows), text_table(adam_header, adam_rows)]
    return "\n".join(md), "\n\n".join(text)


def run_check(a, env, args) -> dict:
    cmd = [a.python, os.path.join(ROOT, "bench", "micro_checks.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"check {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=16, help="sampled responses per update")
    p.add_argument("--k", type=int, default=4, help="RLOO and GRPO samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 512 ids, 2 updates, no checks, no files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scripts", default="ppo,remax,rloo,grpo")
    p.add_argument("--python", default=default_python(".venv"), help="the project's venv")
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench", ".work"))
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--results-name", default="algorithms", help="bench/results/<name>.json and .md")
    p.add_argument("--check-shape", default="16,128,32000", help="B,T,V of the log-prob memory check")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--render-only", action="store_true", help="re-write the tables from bench/results/<name>.json")
    p.add_argument("--no-nice", action="store_true")
    a = p.parse_args()
    if a.render_only:
        with open(os.path.join(RESULTS, a.results_name + ".json")) as f:
            record = json.load(f)
        md, text = render(record)
        print(text)
        write_results(a.results_name, record, md)
        return
    if a.tiny:
        a.hidden, a.layers, a.vocab, a.updates, a.skip_checks = 64, 2, 512, 2, True
    if not a.no_nice:
        os.nice(10)
    a.scripts = a.scripts.split(",")
    machine_info = machine()
    env = bench_env(a.threads)

    workdir = os.path.abspath(a.workdir)
    cmd = [a.python, os.path.join(ROOT, "bench", "assets.py"), "big", workdir, "--hidden", str(a.hidden),
           "--layers", str(a.layers), "--vocab", str(a.vocab)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"building the models failed:\n{res.stderr[-3000:]}")
    assets = json.loads(res.stdout.strip().splitlines()[-1])
    sizes = f"policy {assets['policy_params']:,}, reward model {assets['reward_model_params']:,} parameters"
    print(f"{assets['key']}: {sizes}")

    scratch = tempfile.mkdtemp(prefix="algorithms-")
    summary, raw = {}, {}
    try:
        for script in a.scripts:
            run_dir = os.path.join(scratch, script)
            os.makedirs(run_dir)
            log, outdir = os.path.join(run_dir, "log.txt"), os.path.join(run_dir, "out")
            # the script and the libraries a run loads (common/ imports some lazily), but no model
            modules = f"{script}, accelerate, datasets, transformers.models.llama.modeling_llama"
            imports = run_measured([a.python, "-c", f"import {modules}"], {**env, "PYTHONPATH": ROOT}, run_dir, log)
            print(f"{script}.py ...", end=" ", flush=True)
            res = run_measured(script_cmd(a, script, assets, outdir), env, run_dir, log, a.timeout)
            if res["returncode"] != 0 or imports["returncode"] != 0:
                raise RuntimeError(f"{script} exited with {res['returncode']}:\n{tail(log)}")
            metrics = read_metrics(os.path.join(outdir, "metrics.jsonl"))
            raw[script] = {"measured": res, "imports": imports, "metrics": metrics}
            summary[script] = r = summarise_run(script, metrics, res, imports["peak_rss_mib"], assets)
            print(f"{res['wall_s']:.0f} s, {r['s_per_update']:.2f} s/update, peak RSS {r['peak_rss_mib']:.0f} MiB")
            shutil.rmtree(outdir, ignore_errors=True)  # the saved policy (~650 MB)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    checks = None
    if not a.skip_checks:
        B, T, V = a.check_shape.split(",")
        print("log-prob memory check and AdamW check ...", flush=True)
        variants = [("ours", "1.0"), ("ours", "0.7"), ("naive", "1.0")]
        checks = {
            "logsoftmax": [run_check(a, env, ["--logsoftmax", v, B, T, V, t]) for v, t in variants],
            "adam": run_check(a, env, ["--adam", str(assets["policy_params"] / 1e6)]),
        }

    config = {k: v for k, v in vars(a).items() if k != "workdir"}
    record = {"machine": machine_info, "versions": python_versions(a.python), "config": config, "assets": assets,
              "summary": summary, "checks": checks, "raw": raw}  # fmt: skip
    md, text = render(record)
    print("\n" + text)
    if not a.tiny:
        paths = write_results(a.results_name, record, md)
        print("\nwrote " + " and ".join(os.path.relpath(x, ROOT) for x in paths))


if __name__ == "__main__":
    main()
