"""Memory and time of the three algorithms at >= 100M parameters: ppo.py, remax.py and rloo.py on
one random-weight Llama (hidden 768, 12 layers, a 32000-id vocabulary: 162M parameters; the
reward and value models are the same network with a scalar head, 138M), a few updates each, fp32
on CPU, beside what the models alone should take (PPO holds four models and trains two; RLOO and
ReMax hold three and train one).

Each script runs in its own subprocess through bench/launch_ours.py, which imports it, wraps a few
of its names with timers (generation, no-grad forwards, the update phase, AdamW.step) and calls
its own main(); the scripts themselves are not changed. Peak RSS comes from os.wait4.

Then two micro-checks: what the log-prob computation keeps for backward beside the logits
(common.ops.selective_log_softmax against a plain log_softmax, and the row-wise backward proposed
in bench/README.md), and the time of one AdamW step over the policy's parameters as the scripts
build it (per-tensor loop on CPU) against foreach=True and fused=True.

    .venv/bin/python bench/algorithms.py              # ~8 min on 2 shared cores
    .venv/bin/python bench/algorithms.py --updates 2 --skip-checks

Writes bench/results/algorithms.json and bench/results/algorithms.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from measure import (
    RESULTS, ROOT, bench_env, default_python, machine, markdown_table, python_versions, run_measured, tail, text_table, write_results,
)

HELD_TRAINED = {"ppo": (4, 2), "remax": (3, 1), "rloo": (3, 1)}


def script_cmd(a, script, assets, outdir, out_json) -> list:
    cmd = [
        a.python, os.path.join(ROOT, "bench", "launch_ours.py"), "--script", script, "--out", out_json, "--",
        "--model", assets["policy"], "--reward-model", assets["reward_model"], "--dataset", assets["prompts"],
        "--output-dir", outdir, "--total-episodes", str(a.updates * a.batch_size),
        "--local-micro-batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
        "--learning-rate", "1e-6", "--seed", "1", "--print-samples-every", "0",
    ]
    if script == "rloo":
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


def summarise_run(script: str, rec: dict, res: dict, a, assets) -> dict:
    ups = rec["updates"][1:] if len(rec["updates"]) > 1 else rec["updates"]  # the first one warms up
    total = lambda key: sum(u[key] for u in ups)  # noqa: E731
    step, gen, upd, adam = total("step_s"), total("generate_s"), total("update_s"), total("adam_s")
    policy = rec["policy_label"]
    policy_nograd = sum(u["nograd_forward_s"].get(policy, 0.0) for u in ups)
    held, trained = HELD_TRAINED[script]
    theory = theory_mib(script, assets["policy_params"], assets["reward_model_params"])
    saved = rec["logsoftmax_saved"][0] if rec["logsoftmax_saved"] else None
    return {
        "models_held": held, "models_trained": trained,
        "peak_rss_mib": res["peak_rss_mib"], "rss_after_imports_mib": rec["rss_after_imports_mib"],
        "rss_models_loaded_mib": rec["rss_at_first_update_mib"],
        "peak_above_imports_mib": res["peak_rss_mib"] - rec["rss_after_imports_mib"],
        "theory_model_state_mib": theory,
        "phase_peak_rss_mib": rec["phase_peak_rss_mib"],
        "s_per_update": step / len(ups), "s_per_episode": step / len(ups) / a.batch_size,
        "first_update_s": rec["updates"][0]["step_s"], "process_s": res["wall_s"],
        "generated_tokens_per_s": total("generated_tokens") / gen if gen else float("nan"),
        "generated_tokens_per_update": total("generated_tokens") / len(ups),
        "generate_calls_per_update": total("generate_calls") / len(ups),
        "train_tokens_per_s": total("train_tokens") / upd if upd else float("nan"),
        "train_tokens_per_update": total("train_tokens") / len(ups),
        "generate_share": gen / step, "update_share": upd / step, "rollout_other_share": 1 - (gen + upd) / step,
        "adam_s_per_update": adam / len(ups), "adam_share": adam / step,
        "policy_nograd_forward_s_per_update": policy_nograd / len(ups),
        "nograd_forward_s_per_update": {k: v / len(ups) for k, v in _sum_dicts([u["nograd_forward_s"] for u in ups]).items()},
        "policy_label": policy,
        "logsoftmax_saved_for_backward": saved,
    }


def _sum_dicts(ds: list) -> dict:
    out = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def run_check(a, env, args) -> dict:
    res = subprocess.run([a.python, os.path.join(ROOT, "bench", "launch_ours.py"), *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"check {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def render(record: dict) -> tuple:
    a, s, assets, m = record["config"], record["summary"], record["assets"], record["machine"]
    mem_header = ["script", "models held / trained", "peak RSS MiB", "RSS after imports", "peak above imports",
                  "theory: weights+grads+AdamW MiB", "above imports / theory"]
    time_header = ["script", "s / update", "ms / episode", "generated tok/s", "training tok/s", "generation share", "update share",
                   "AdamW share", "policy no-grad forward s / update"]
    mem_rows, time_rows = [], []
    for script in a["scripts"]:
        if script not in s:
            continue
        r = s[script]
        mem_rows.append([f"{script}.py", f"{r['models_held']} / {r['models_trained']}", f"{r['peak_rss_mib']:.0f}", f"{r['rss_after_imports_mib']:.0f}",
                         f"{r['peak_above_imports_mib']:.0f}", f"{r['theory_model_state_mib']:.0f}",
                         f"{r['peak_above_imports_mib'] / r['theory_model_state_mib']:.2f}"])
        time_rows.append([f"{script}.py", f"{r['s_per_update']:.2f}", f"{1e3 * r['s_per_episode']:.0f}", f"{r['generated_tokens_per_s']:.0f}",
                          f"{r['train_tokens_per_s']:.0f}", f"{100 * r['generate_share']:.0f}%", f"{100 * r['update_share']:.0f}%",
                          f"{100 * r['adam_share']:.0f}%", f"{r['policy_nograd_forward_s_per_update']:.2f}"])
    ratio_rows = []
    for other in ("rloo", "remax"):
        if "ppo" in s and other in s:
            q = s["ppo"]["peak_rss_mib"] / s[other]["peak_rss_mib"]
            q2 = s["ppo"]["peak_above_imports_mib"] / s[other]["peak_above_imports_mib"]
            qt = s["ppo"]["theory_model_state_mib"] / s[other]["theory_model_state_mib"]
            ratio_rows.append([f"ppo / {other}", f"{q:.2f}x", f"{q2:.2f}x", f"{qt:.2f}x", f">= 1.6x: {'met' if q >= 1.6 else 'NOT met'}"])
    ratio_header = ["peak memory", "peak RSS", "peak above imports", "theory (model state)", "target (peak RSS)"]
    md = [
        "# The three algorithms at >= 100M parameters (bench/algorithms.py)",
        "",
        f"Machine: {m['cpu_cores']} CPU cores (shared with other work; load average {m['loadavg_at_start']} at start), fp32, "
        f"{a['threads']} intra-op thread(s), nice 10. {m['date']}, code at {m.get('code', '?')}. "
        + ", ".join(f"{k} {v}" for k, v in record['versions'].items()) + ".",
        "",
        f"Models: random-weight Llama {assets['key']}: policy and reference {assets['policy_params'] / 1e6:.1f}M parameters, reward model "
        f"(and PPO's value model, a trainable copy of it) {assets['reward_model_params'] / 1e6:.1f}M. {a['batch_size']} sampled responses "
        f"per update (RLOO: {a['batch_size'] // a['k']} prompts x K={a['k']}; ReMax: {a['batch_size']} prompts, plus {a['batch_size']} greedy; "
        f"PPO: {a['batch_size']} prompts, 4 epochs), one micro-batch, at most {a['max_new_tokens']} new tokens (mean response length: "
        + ", ".join(f"{k} {v['generated_tokens_per_update'] / (a['batch_size'] * v['generate_calls_per_update']):.1f}" for k, v in s.items())
        + f"), {a['updates']} updates; times are means over updates 2..{a['updates']}. Learning rate 1e-6.",
        "",
        markdown_table(mem_header, mem_rows),
        "",
        "Theory: 4 bytes x (weights of every model held + gradient and two AdamW moments of every model trained); the reward and "
        "value models have no LM head, so they are smaller than the policy. \"Above imports\" subtracts the RSS of the process once "
        "torch, transformers and the script are imported (the models are loaded after that, memory-mapped from safetensors and "
        "paged in on first use). The rest above theory is activations, logits, the KV cache and allocator slack.",
        "",
        markdown_table(ratio_header, ratio_rows),
        "",
        markdown_table(time_header, time_rows),
        "",
        "Generated tok/s: response tokens sampled (ReMax: sampled and greedy) per second of `generate`. Training tok/s: tokens "
        "(prompt + response) through the training forward and backward per second of the update phase (PPO: through policy and "
        "value model, in each of its 4 epochs). Shares are of the whole update step; the rest is scoring, the no-grad log-prob "
        "forwards and the advantage math. Policy no-grad forward: step 3's forward of the policy, which for ReMax (and for RLOO "
        "with one epoch and one minibatch) computes the same logits as the training forward that follows.",
    ]
    text = [text_table(mem_header, mem_rows), text_table(ratio_header, ratio_rows), text_table(time_header, time_rows)]
    checks = record.get("checks")
    if checks:
        ls_header = ["log-probs of (B, T, V) logits", "logits MiB", "kept for backward beside the logits MiB", "RSS peak above start MiB", "s (fwd+bwd)"]
        ls_rows = [[f"{c['variant']} (temperature {c['temperature']})", f"{c['logits_mib']:.0f}", f"{c['extra_saved_for_backward_mib']:.0f}",
                    f"{c['rss_peak_above_start_mib']:.0f}", f"{c['seconds']:.2f}"] for c in checks["logsoftmax"]]
        c0 = checks["logsoftmax"][0]
        ad = checks["adam"]
        adam_header = ["AdamW step", f"s per step, {ad['params'] / 1e6:.0f}M fp32 parameters"]
        adam_rows = [["torch.optim.AdamW() as the scripts build it", f"{ad['default_s']:.3f}"],
                     ["foreach=True", f"{ad['foreach_s']:.3f}"], ["fused=True", f"{ad['fused_s']:.3f}"]]
        md += [
            "",
            f"Log-prob memory, B={c0['B']}, T={c0['T']}, V={c0['V']} fp32 logits from a linear layer (fresh process per row): "
            "\"ours\" is common.ops.selective_log_softmax, \"naive\" is log_softmax(logits / t).gather, \"proposed\" is the "
            "row-wise backward sketched in bench/launch_ours.py (RowLogSoftmax).",
            "",
            markdown_table(ls_header, ls_rows),
            "",
            markdown_table(adam_header, adam_rows),
        ]
        text += [text_table(ls_header, ls_rows), text_table(adam_header, adam_rows)]
    return "\n".join(md), "\n\n".join(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=16, help="sampled responses per update")
    p.add_argument("--k", type=int, default=4, help="RLOO samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scripts", default="ppo,remax,rloo")
    p.add_argument("--python", default=default_python(".venv"), help="the project's venv")
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench", ".work"))
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--results-name", default="algorithms", help="bench/results/<name>.json and .md")
    p.add_argument("--check-shape", default="16,128,32000", help="B,T,V of the log-prob memory check")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--render-only", action="store_true", help="re-write the tables from bench/results/algorithms.json")
    p.add_argument("--no-nice", action="store_true")
    a = p.parse_args()
    if a.render_only:
        with open(os.path.join(RESULTS, a.results_name + ".json")) as f:
            record = json.load(f)
        md, text = render(record)
        print(text)
        write_results(a.results_name, record, md)
        return
    if not a.no_nice:
        os.nice(10)
    a.scripts = a.scripts.split(",")
    machine_info = machine()
    env = bench_env(a.threads)

    workdir = os.path.abspath(a.workdir)
    res = subprocess.run([a.python, os.path.join(ROOT, "bench", "assets.py"), "big", workdir, "--hidden", str(a.hidden),
                          "--layers", str(a.layers), "--vocab", str(a.vocab)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"building the models failed:\n{res.stderr[-3000:]}")
    assets = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{assets['key']}: policy {assets['policy_params']:,} parameters, reward model {assets['reward_model_params']:,}")

    scratch = tempfile.mkdtemp(prefix="algorithms-")
    summary, raw = {}, {}
    try:
        for script in a.scripts:
            run_dir = os.path.join(scratch, script)
            os.makedirs(run_dir)
            out_json, log = os.path.join(run_dir, "probe.json"), os.path.join(run_dir, "log.txt")
            print(f"{script}.py ...", end=" ", flush=True)
            res = run_measured(script_cmd(a, script, assets, os.path.join(run_dir, "out"), out_json), env, run_dir, log, a.timeout)
            if res["returncode"] != 0:
                raise RuntimeError(f"{script} exited with {res['returncode']}:\n{tail(log)}")
            with open(out_json) as f:
                rec = json.load(f)
            raw[script] = {"measured": res, "probe": rec}
            summary[script] = summarise_run(script, rec, res, a, assets)
            r = summary[script]
            print(f"{res['wall_s']:.0f} s, {r['s_per_update']:.1f} s/update, peak RSS {r['peak_rss_mib']:.0f} MiB")
            shutil.rmtree(os.path.join(run_dir, "out"), ignore_errors=True)  # the saved policy (~650 MB)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    checks = None
    if not a.skip_checks:
        B, T, V = a.check_shape.split(",")
        print("log-prob memory check and AdamW check ...", flush=True)
        checks = {"logsoftmax": [run_check(a, env, ["--logsoftmax-check", v, B, T, V, temp])
                                 for v, temp in [("ours", "1.0"), ("ours", "0.7"), ("naive", "1.0"), ("proposed", "1.0")]],
                  "adam": run_check(a, env, ["--adam-check", str(assets["policy_params"] / 1e6)])}

    config = {k: v for k, v in vars(a).items() if k != "workdir"}
    record = {"machine": machine_info, "versions": python_versions(a.python), "config": config, "assets": assets,
              "summary": summary, "checks": checks, "raw": raw}
    md, text = render(record)
    print("\n" + text)
    paths = write_results(a.results_name, record, md)
    print("\nwrote " + " and ".join(os.path.relpath(x, ROOT) for x in paths))


if __name__ == "__main__":
    main()
