"""Peak memory of one update of rloo.py, remax.py, ppo.py and grpo.py, full fine-tuning against LoRA (issue 14),
at >= 100M parameters: a random-weight Llama (by default hidden 768, 12 layers, a 32000-id vocabulary, untied LM
head: 162M parameters) as the policy, the same network with a scalar head as the reward model and PPO's value model,
fp32 on CPU, beside the theory of what the models and their training state take:
    full fine-tuning: 16 bytes per trained parameter (weight, gradient, AdamW's two moments) + 4 per frozen one:
        16 P + 4 P (reference) + 4 R (reward model), PPO + 16 R (value model)
    LoRA: 4 bytes per weight, held once (the reference is the policy with its adapters off) + 16 per adapter parameter:
        4 P + 16 a + 4 R, PPO + 4 R + 16 (a_v + its score head)

Both run through each script's command line, LoRA with `--lora-r <rank>` (PPO: adapters on policy and value model).
Each configuration runs in a fresh process; its peak RSS comes from os.wait4 (bench/measure.py), and the floor is the
peak of a process that only imports what the scripts import (torch, transformers, accelerate, datasets, peft). A
configuration whose theory does not fit the memory available now (less --headroom-gib) is skipped and said so.

    .venv/bin/python bench/lora_memory.py                            # 162M, ~8 min on 2 cores (OMP_NUM_THREADS=1)
    .venv/bin/python bench/lora_memory.py --hidden 1280 --layers 12  # 397M, ~17 min
    .venv/bin/python bench/lora_memory.py --hidden 1536 --layers 16  # 702M, ~20 min, 17 GiB; PPO full does not fit
    .venv/bin/python bench/lora_memory.py --tiny                     # a 2-layer model: a smoke test, writes nothing

Each size's results replace that size's entry in bench/results/lora_memory.json; lora_memory.md shows all sizes.
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

SCRIPTS = ("rloo", "remax", "ppo", "grpo")
TARGETS = {"rloo": 0.45, "remax": 0.45, "ppo": 0.45}  # peak RSS with LoRA / without, at most
# glibc raises its mmap threshold after the first large free (up to 32 MiB), after which freed activations stay in
# the heap: RSS then keeps a high-water mark of temporaries (LoRA's forward makes more: B(A x), its scaling and the
# sum are each as large as the layer's output). A fixed threshold returns every large free block to the system, so
# the peak RSS follows the live tensors, as a GPU's max_memory_allocated does. Both are measured.
ALLOCATORS = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
IMPORTS = "import torch, transformers, accelerate, datasets, peft, tyro, rloo, remax, ppo, grpo, common.lora"


# ---- a child (its own process) ----


def build(workdir: str, hidden: int, layers: int, vocab: int, rank: int) -> dict:
    """The random-weight policy and reward model, a tokenizer with `vocab` ids, the toy prompts; parameter
    counts, and adapter sizes of rank `rank` (counted on meta-device models). Cached in workdir."""
    sys.path.insert(0, ROOT)
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig
    from transformers import PreTrainedTokenizerFast

    from common.lora import add_lora
    from common.toy import LETTERS, SEPARATOR, toy_dataset

    key = f"llama-h{hidden}-l{layers}-v{vocab}"
    policy, rm = os.path.join(workdir, key, "policy"), os.path.join(workdir, key, "reward-model")
    prompts = os.path.join(workdir, "prompts.jsonl")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    if not os.path.exists(os.path.join(rm, "config.json")):
        print(f"building random-weight {key} policy and reward model in {workdir}", file=sys.stderr)
        ids = {"<pad>": 0, "</s>": 1, SEPARATOR: 2, **{c: 3 + i for i, c in enumerate(LETTERS)}}
        ids.update({f"<t{i}>": i for i in range(len(ids), vocab)})  # a realistic LM head over the toy's characters
        backend = Tokenizer(models.WordLevel(ids, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        backend.decoder = decoders.Fuse()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(policy)
        config.num_labels = 1
        AutoModelForSequenceClassification.from_config(config).save_pretrained(rm)
        for path in (policy, rm):
            tokenizer.save_pretrained(path)
    config.num_labels = 1
    if not os.path.exists(prompts):
        with open(prompts, "w") as f:
            for prompt in toy_dataset(512)["prompt"]:
                f.write(json.dumps({"prompt": prompt}) + "\n")
    lora = argparse.Namespace(lora_r=rank, lora_alpha=16.0, lora_target_modules="all-linear")
    with torch.device("meta"):
        p = AutoModelForCausalLM.from_config(config)
        v = AutoModelForSequenceClassification.from_config(config)
        P, R = (sum(t.numel() for t in m.parameters()) for m in (p, v))
        a, a_v = (sum(t.numel() for t in add_lora(m, lora).parameters() if t.requires_grad) for m in (p, v))
    return {"key": key, "policy": policy, "reward_model": rm, "prompts": prompts, "P": P, "R": R, "a": a, "a_v": a_v}


# ---- the parent: standard library only (its RSS at fork counts in every child's peak) ----


def script_cmd(a, script: str, lora: bool, assets: dict, outdir: str) -> list:
    cmd = [
        a.python, os.path.join(ROOT, f"{script}.py"), "--model", assets["policy"],
        "--reward-model", assets["reward_model"], "--dataset", assets["prompts"], "--output-dir", outdir, "--overwrite",
        "--total-episodes", str(a.batch_size), "--local-micro-batch-size", str(a.batch_size),
        "--max-new-tokens", str(a.max_new_tokens), "--learning-rate", "1e-6", "--seed", "1",
        "--print-samples-every", "0",
    ]  # fmt: skip
    cmd += ["--num-generations", str(a.k)] if script in ("rloo", "grpo") else []
    return cmd + (["--lora-r", str(a.rank)] if lora else [])


def theory_mib(script: str, lora: bool, s: dict) -> float:
    """Bytes of the models' weights and training state (module docstring), in MiB."""
    P, R, a, a_v = s["P"], s["R"], s["a"], s["a_v"]
    if lora:
        n = 4 * P + 16 * a + 4 * R + (4 * R + 16 * a_v if script == "ppo" else 0)
    else:
        n = 16 * P + 4 * P + 4 * R + (16 * R if script == "ppo" else 0)
    return n / 2**20


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


def run_config(a, env: dict, script: str, lora: bool, allocator: str, assets: dict, floor: float) -> dict:
    mode = "lora" if lora else "full"
    row = {"script": script, "mode": mode, "allocator": allocator, "theory_mib": theory_mib(script, lora, assets)}
    need, free = floor + 1.1 * row["theory_mib"], available_mib() - 1024 * a.headroom_gib
    if need > free:  # would push the machine (shared with other work) into swapping or the OOM killer
        print(f"{script} {mode} ({allocator}): skipped, needs ~{need:.0f} MiB, {free:.0f} MiB free", flush=True)
        return {**row, "skipped": f"does not fit: needs ~{need / 1024:.1f} GiB, {free / 1024:.1f} GiB free"}
    print(f"{script} {mode} ({allocator}) ...", flush=True)
    outdir = os.path.join(a.workdir, "runs", f"{script}-{mode}")  # its log beside it
    os.makedirs(os.path.dirname(outdir), exist_ok=True)
    cmd = script_cmd(a, script, lora, assets, outdir)
    res = run_measured(cmd, {**env, **ALLOCATORS[allocator]}, a.workdir, f"{outdir}.log", timeout=a.timeout)
    if res["returncode"] != 0:
        raise RuntimeError(f"{script} {mode} failed ({res['returncode']}):\n{tail(res['log'])}")
    first = next(m for m in read_metrics(os.path.join(outdir, "metrics.jsonl")) if "objective/kl" in m)
    return {
        **row, "peak_rss_mib": res["peak_rss_mib"], "wall_s": res["wall_s"], "first_update_kl": first["objective/kl"],
        "update_s": sum(first[f"time/{p}"] for p in ("rollout", "score", "logprobs", "update")),
    }  # fmt: skip


def full_row(record: dict, r: dict) -> dict:
    key = (r["script"], "full", r["allocator"])
    return next(f for f in record["rows"] if (f["script"], f["mode"], f["allocator"]) == key)


def ratios(record: dict, r: dict) -> tuple:
    """(peak LoRA/full, above the floor LoRA/full), or (None, None) when not both were measured."""
    full = full_row(record, r)
    if r["mode"] != "lora" or "peak_rss_mib" not in r or "peak_rss_mib" not in full:
        return None, None
    floor = record["floor_rss_mib"][r["allocator"]]
    return r["peak_rss_mib"] / full["peak_rss_mib"], (r["peak_rss_mib"] - floor) / (full["peak_rss_mib"] - floor)


def verdict(record: dict, r: dict) -> str:
    """Against the target; where full fine-tuning did not fit, LoRA's peak against full's theory + floor (a rough
    estimate: full's measured peaks were 1% below to 11% above that, so the true ratio is likely this or lower)."""
    target, ratio = TARGETS.get(r["script"]), ratios(record, r)[0]
    if r["mode"] != "lora" or target is None or "peak_rss_mib" not in r:
        return ""
    if ratio is not None:
        return f"<= {target}: {'met' if ratio <= target else 'NOT met'}"
    estimate = r["peak_rss_mib"] / (record["floor_rss_mib"][r["allocator"]] + full_row(record, r)["theory_mib"])
    return f"<= {target}: full not measured; ~{estimate:.2f}x of its theory + floor"


def size_table(record: dict) -> tuple:
    header = ["script", "fine-tuning", "malloc", "peak RSS MiB", "above floor MiB", "theory MiB", "rest"]
    header += ["LoRA/full peak", "above floor", "target"]
    table = []
    for r in record["rows"]:
        ratio, above_ratio = ratios(record, r)
        tuning = f"LoRA r={record['config']['rank']}" if r["mode"] == "lora" else "full"
        cells = [f"{r['script']}.py", tuning, r["allocator"]]
        if "skipped" in r:
            table.append(cells + [r["skipped"], "", f"{r['theory_mib']:.0f}", "", "", "", ""])
            continue
        above = r["peak_rss_mib"] - record["floor_rss_mib"][r["allocator"]]
        table.append(cells + [
            f"{r['peak_rss_mib']:.0f}", f"{above:.0f}", f"{r['theory_mib']:.0f}", f"{above - r['theory_mib']:.0f}",
            "" if ratio is None else f"{ratio:.3f}x", "" if ratio is None else f"{above_ratio:.3f}x",
            verdict(record, r),
        ])  # fmt: skip
    return header, table


def size_notes(record: dict) -> str:
    s, c, rows = record["assets"], record["config"], record["rows"]
    kl = sorted({r["first_update_kl"] for r in rows if r["mode"] == "lora" and "first_update_kl" in r})
    skipped = [f"{r['script']} {r['mode']} ({r['allocator']})" for r in rows if "skipped" in r]
    return (
        f"Models: random-weight {s['key']}: policy P = {s['P'] / 1e6:.1f}M parameters, reward model (and PPO's value "
        f"model) R = {s['R'] / 1e6:.1f}M; LoRA rank {c['rank']}, alpha 16, all-linear: a = {s['a'] / 1e6:.2f}M adapter "
        f"parameters on the policy, a_v = {s['a_v'] / 1e6:.2f}M on the value model (its score head included). "
        f"Floor: {', '.join(f'{k} {v:.0f} MiB' for k, v in record['floor_rss_mib'].items())}. "
        f"First update's KL with LoRA, every script and malloc: {', '.join(map(str, kl)) or 'none measured'}. "
        + (f"Not measured (theory + floor above the memory free, less {c['headroom_gib']} GiB of headroom): "
           f"{', '.join(skipped)}. " if skipped else "")
        + f"Bench wall time at this size: {record['wall_s'] / 60:.1f} min ({record['machine']['date']})."
    )  # fmt: skip


def summary_table(records: list) -> tuple:
    header = ["model", "P", "malloc"] + [f"{s}.py LoRA/full" for s in SCRIPTS]
    table = []
    for record in records:
        for allocator in ALLOCATORS:
            cells = {}
            for r in record["rows"]:
                if r["mode"] == "lora" and r["allocator"] == allocator:
                    ratio = ratios(record, r)[0]
                    judged = verdict(record, r).split(": ", 1)[-1]
                    text = f"{ratio:.3f}x" if ratio is not None else judged or "not measured"
                    cells[r["script"]] = text + (f" ({judged})" if ratio is not None and judged else "")
            s = record["assets"]
            table.append([s["key"], f"{s['P'] / 1e6:.0f}M", allocator] + [cells.get(x, "") for x in SCRIPTS])
    return header, table


def render(records: list) -> str:
    c, m = records[0]["config"], records[0]["machine"]
    md = [
        "# Peak memory with and without LoRA (bench/lora_memory.py)",
        "",
        f"Machine: {m['cpu_cores']} CPU cores, fp32 on CPU, OMP_NUM_THREADS={c['threads']}, "
        f"torch {records[0]['versions'].get('torch')}. One update of {c['batch_size']} responses (RLOO/GRPO: K = "
        f"{c['k']}), one micro-batch, at most {c['max_new_tokens']} new tokens, each configuration a fresh process "
        "run through the script's command line (LoRA: `--lora-r`; PPO's value model gets adapters too; the reference "
        "is the policy with its adapters off). Peak RSS from wait4; target: LoRA's peak RSS at most 0.45x of full "
        "fine-tuning's for rloo.py, remax.py and ppo.py (grpo.py shown alongside).",
        "",
        "Theory (weights, gradients, AdamW moments; P policy, R reward/value model, a and a_v adapter parameters):",
        "full fine-tuning 16 P + 4 P (reference) + 4 R (reward model), PPO + 16 R (value model); LoRA 4 P + 16 a + "
        "4 R, PPO + 4 R + 16 a_v. Rest: the peak above the floor (a process that imports what the scripts import and "
        "loads nothing) less the theory: activations, logits, the KV cache and, under glibc's default malloc, freed "
        "memory the allocator keeps. Fixed mmap threshold: MALLOC_MMAP_THRESHOLD_=65536, large frees go back to the "
        "system at once, so the peak follows the live tensors (as a GPU's max_memory_allocated would). Verdicts "
        "compare the unrounded ratio. Where full fine-tuning did not fit, LoRA's peak is set against full's theory + "
        "floor, a rough estimate (full's measured peaks were 1% below to 11% above that).",
        "",
        markdown_table(*summary_table(records)),
    ]
    for record in records:
        md += ["", f"## {record['assets']['key']}", "", markdown_table(*size_table(record)), "", size_notes(record)]
    return "\n".join(md)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (intermediate 4x, heads of 64)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    parser.add_argument("--headroom-gib", type=float, default=4, help="memory left to other work; else skipped")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 512-id model; nothing is written")
    parser.add_argument("--python", default=default_python(".venv"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "bench", ".work", "lora-memory"))
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # child modes
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.build:
        return print(json.dumps(build(a.workdir, a.hidden, a.layers, a.vocab, a.rank)))
    if a.floor:
        sys.path.insert(0, ROOT)
        return exec(IMPORTS)

    start, at_start = time.perf_counter(), machine()
    if a.tiny:
        a.hidden, a.layers, a.vocab = 64, 2, 512
        a.workdir = tempfile.mkdtemp(prefix="lora-memory-")
    os.makedirs(a.workdir, exist_ok=True)
    env, me = bench_env(a.threads), [a.python, os.path.abspath(__file__), "--workdir", a.workdir]
    size = ["--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab), "--rank", str(a.rank)]
    out = subprocess.run([*me, "--build", *size], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    assets = json.loads(out.stdout.strip().splitlines()[-1])
    log = os.path.join(a.workdir, "floor.log")
    floors = {k: run_measured([*me, "--floor"], {**env, **x}, ROOT, log)["peak_rss_mib"] for k, x in ALLOCATORS.items()}
    rows = [
        run_config(a, env, script, lora, allocator, assets, floors[allocator])
        for allocator in ALLOCATORS
        for script in a.scripts
        for lora in (False, True)
    ]
    config = {k: getattr(a, k) for k in ("rank", "batch_size", "k", "max_new_tokens", "threads", "headroom_gib")}
    record = {
        "config": config, "machine": at_start, "versions": python_versions(a.python), "assets": assets,
        "floor_rss_mib": floors, "rows": rows, "wall_s": time.perf_counter() - start,
    }  # fmt: skip
    print(text_table(*size_table(record)) + "\n\n" + size_notes(record))
    if a.tiny:
        return shutil.rmtree(a.workdir)
    path = os.path.join(RESULTS, "lora_memory.json")
    sizes = {}
    if os.path.exists(path):
        with open(path) as f:
            sizes = json.load(f).get("sizes", {})  # an older file, of one size, is dropped
    sizes[assets["key"]] = record
    records = sorted(sizes.values(), key=lambda r: r["assets"]["P"])
    print(
        "written:", *write_results("lora_memory", {"sizes": {r["assets"]["key"]: r for r in records}}, render(records))
    )


if __name__ == "__main__":
    main()
