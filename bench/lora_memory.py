"""Peak memory of one update of rloo.py, remax.py, ppo.py and grpo.py, full fine-tuning against LoRA (issue 14),
at >= 100M parameters: a random-weight Llama (hidden 768, 12 layers, a 32000-id vocabulary, untied LM head: 162M
parameters) as the policy, the same network with a scalar head (138M) as the reward model and PPO's value model,
fp32 on CPU, beside the theory of what the models and their training state take:
    full fine-tuning: 16 bytes per trained parameter (weight, gradient, AdamW's two moments) + 4 per frozen one:
        16 P + 4 P (reference) + 4 R (reward model), PPO + 16 R (value model)
    LoRA: 4 bytes per weight, held once (the reference is the policy with its adapters off) + 16 per adapter parameter:
        4 P + 16 a + 4 R, PPO + 4 R + 16 (a_v + its score head)

Each configuration runs in a fresh process; its peak RSS comes from os.wait4 (bench/measure.py), and the floor is the
peak of a process that only imports what the scripts import (torch, transformers, accelerate, datasets, peft). Full
fine-tuning runs through each script's command line. LoRA runs through `--lora-r` once a script has the flag; until
then through a stand-in of the wiring, labelled as such: this file's --stand-in mode imports the script, puts
common.lora's add_lora (policy, PPO's value model) and load_reference (the reference) where the wired script calls
them, and calls its main() on the same command line; nothing else of the script changes.

    .venv/bin/python bench/lora_memory.py            # ~15 min on 2 cores (OMP_NUM_THREADS=1)
    .venv/bin/python bench/lora_memory.py --tiny     # a 2-layer model: a smoke test (~2 min), writes nothing

Writes bench/results/lora_memory.json and bench/results/lora_memory.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import (  # noqa: E402
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
IMPORTS = (  # what a run imports before it loads a model
    "import torch, transformers, accelerate, datasets, peft, tyro, rloo, remax, ppo, grpo, common.lora\n"
    "from transformers import LlamaForCausalLM, LlamaForSequenceClassification, GenerationMixin"
)


# ---- children (each its own process) ----


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


def stand_in(script: str, rank: int, flags: list) -> None:
    """The script's main() on `flags` with LoRA of rank `rank` wired as the wired scripts do: the policy
    through add_lora, the reference as load_reference(args, policy) (no second load), PPO's value model
    through add_lora. The adapter is saved by PeftModel.save_pretrained from the full state dict."""
    sys.path.insert(0, ROOT)
    import importlib

    import tyro

    from common.lora import add_lora, load_reference

    module = importlib.import_module(script)
    lora = argparse.Namespace(lora_r=rank, lora_alpha=16.0, lora_target_modules="all-linear", merge_lora=False)
    real_load_policy, held = module.load_policy, {}

    def load_policy(*args):
        if "policy" in held:  # the reference's load: none with LoRA
            return None
        held["policy"] = add_lora(real_load_policy(*args), lora)
        return held["policy"]

    module.load_policy = load_policy
    module.load_frozen = lambda model: load_reference(lora, held["policy"])
    if hasattr(module, "load_value_model"):
        real_load_value_model = module.load_value_model
        module.load_value_model = lambda args: add_lora(real_load_value_model(args), lora)
    module.main(tyro.cli(module.Args, args=flags))


# ---- the parent: standard library only (its RSS at fork counts in every child's peak) ----


def has_lora_flag(python: str, script: str, env: dict) -> bool:
    out = subprocess.run(
        [python, os.path.join(ROOT, f"{script}.py"), "--help"], capture_output=True, text=True, env=env
    )
    return "--lora-r" in out.stdout


def script_flags(script: str, assets: dict, outdir: str, a) -> list:
    flags = [
        "--model", assets["policy"], "--reward-model", assets["reward_model"], "--dataset", assets["prompts"],
        "--output-dir", outdir, "--overwrite", "--total-episodes", str(a.batch_size),
        "--local-micro-batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
        "--learning-rate", "1e-6", "--seed", "1", "--print-samples-every", "0",
    ]  # fmt: skip
    return flags + (["--num-generations", str(a.k)] if script in ("rloo", "grpo") else [])


def theory_mib(script: str, lora: bool, s: dict) -> float:
    """Bytes of the models' weights and training state (module docstring), in MiB."""
    P, R, a, a_v = s["P"], s["R"], s["a"], s["a_v"]
    if lora:
        n = 4 * P + 16 * a + 4 * R + (4 * R + 16 * a_v if script == "ppo" else 0)
    else:
        n = 16 * P + 4 * P + 4 * R + (16 * R if script == "ppo" else 0)
    return n / 2**20


def run_config(a, env, script, mode, allocator, assets, workdir) -> dict:
    env = {**env, **ALLOCATORS[allocator]}
    outdir = os.path.join(workdir, "runs", f"{script}-{mode}")
    flags = script_flags(script, assets, outdir, a)
    if mode == "full":
        cmd, wiring = [a.python, os.path.join(ROOT, f"{script}.py"), *flags], "script CLI"
    elif has_lora_flag(a.python, script, env):
        cmd, wiring = (
            [a.python, os.path.join(ROOT, f"{script}.py"), *flags, "--lora-r", str(a.rank)],
            "script CLI --lora-r",
        )
    else:
        cmd = [a.python, os.path.abspath(__file__), "--stand-in", script, "--rank", str(a.rank), "--", *flags]
        wiring = "STAND-IN wiring (no --lora-r yet)"
    print(f"{script} {mode} ({allocator}): {wiring} ...", flush=True)
    res = run_measured(cmd, env, workdir, os.path.join(workdir, f"{script}-{mode}.log"), timeout=a.timeout)
    if res["returncode"] != 0:
        raise RuntimeError(f"{script} {mode} failed ({res['returncode']}):\n{tail(res['log'])}")
    first = read_metrics(os.path.join(outdir, "metrics.jsonl"))[0]
    return {
        "script": script, "mode": mode, "allocator": allocator, "wiring": wiring, "peak_rss_mib": res["peak_rss_mib"],
        "wall_s": res["wall_s"],
        "theory_mib": theory_mib(script, mode == "lora", assets), "first_update_kl": first["objective/kl"],
        "update_s": sum(first[f"time/{p}"] for p in ("rollout", "score", "logprobs", "update")),
    }  # fmt: skip


def render(record: dict) -> tuple:
    rows, s, floors = record["rows"], record["assets"], record["floor_rss_mib"]
    by = {(r["script"], r["mode"], r["allocator"]): r for r in rows}
    header = ["script", "fine-tuning", "run through", "malloc", "peak RSS MiB", "above floor MiB", "theory MiB", "rest"]
    header += ["LoRA/full peak", "above floor", "target"]
    table = []
    for r in rows:
        full, floor = by.get((r["script"], "full", r["allocator"])), floors[r["allocator"]]
        ratio = r["peak_rss_mib"] / full["peak_rss_mib"] if r["mode"] == "lora" and full else None
        above_ratio = (r["peak_rss_mib"] - floor) / (full["peak_rss_mib"] - floor) if ratio else None
        target = TARGETS.get(r["script"]) if r["mode"] == "lora" else None
        verdict = "" if target is None else f"<= {target}: {'met' if ratio <= target else 'NOT met'}"
        above = r["peak_rss_mib"] - floor
        table.append([
            f"{r['script']}.py", f"LoRA r={record['config']['rank']}" if r["mode"] == "lora" else "full", r["wiring"],
            r["allocator"], f"{r['peak_rss_mib']:.0f}", f"{above:.0f}", f"{r['theory_mib']:.0f}",
            f"{above - r['theory_mib']:.0f}", "" if ratio is None else f"{ratio:.2f}x",
            "" if ratio is None else f"{above_ratio:.2f}x", verdict,
        ])  # fmt: skip
    c = record["config"]
    notes = [
        f"Models: random-weight {s['key']}: policy P = {s['P'] / 1e6:.1f}M parameters, reward model (and PPO's value "
        f"model) R = {s['R'] / 1e6:.1f}M; LoRA rank {c['rank']}, alpha 16, all-linear: a = {s['a'] / 1e6:.2f}M adapter "
        f"parameters on the policy, a_v = {s['a_v'] / 1e6:.2f}M on the value model (its score head included). One "
        f"update of {c['batch_size']} responses (RLOO/GRPO: K = {c['k']}), one micro-batch, at most "
        f"{c['max_new_tokens']} new tokens, fp32, CPU, OMP_NUM_THREADS={c['threads']}.",
        "Floor: the peak RSS of a process that imports what the scripts import and loads nothing ("
        + ", ".join(f"{k}: {v:.0f} MiB" for k, v in floors.items())
        + "). Theory: weights, gradients and AdamW moments only (module docstring); the rest above the floor is "
        "activations, logits, the KV cache and, under glibc's default, freed memory kept by the allocator. malloc: "
        "glibc's default, or MALLOC_MMAP_THRESHOLD_=65536 (large frees go back to the system at once, so the peak "
        "follows the live tensors). The first update's KL with LoRA: "
        + ", ".join(f"{r['script']} {r['first_update_kl']} / {r['allocator']}" for r in rows if r["mode"] == "lora")
        + " (the reference is the policy with its adapters off, B = 0 at the start). Target: the peak RSS ratio.",
    ]
    text = text_table(header, table) + "\n\n" + "\n".join(notes)
    md = "\n".join(
        ["# Peak memory with and without LoRA (bench/lora_memory.py)", "", markdown_table(header, table), ""] + notes
    )
    return text, md


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 512-id model; nothing is written")
    parser.add_argument("--python", default=default_python(".venv"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "bench", ".work", "lora-memory"))
    # child modes
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stand-in", dest="stand_in", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=768, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    a, rest = parser.parse_known_args()
    if a.build:
        return print(json.dumps(build(a.workdir, a.hidden, a.layers, a.vocab, a.rank)))
    if a.stand_in:
        return stand_in(a.stand_in, a.rank, [f for f in rest if f != "--"])
    if a.floor:
        sys.path.insert(0, ROOT)
        return exec(IMPORTS)

    if a.tiny:
        a.hidden, a.layers, a.vocab = 64, 2, 512
        a.workdir = tempfile.mkdtemp(prefix="lora-memory-")
    os.makedirs(a.workdir, exist_ok=True)
    env = bench_env(a.threads)
    size = ["--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab), "--rank", str(a.rank)]
    out = subprocess.run(
        [a.python, os.path.abspath(__file__), "--build", "--workdir", a.workdir, *size],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    assets = json.loads(out.stdout.strip().splitlines()[-1])
    floors = {}
    for allocator, extra in ALLOCATORS.items():
        cmd = [a.python, os.path.abspath(__file__), "--floor"]
        floors[allocator] = run_measured(cmd, {**env, **extra}, ROOT, os.path.join(a.workdir, "floor.log"))[
            "peak_rss_mib"
        ]
    rows = [
        run_config(a, env, script, mode, allocator, assets, a.workdir)
        for allocator in ALLOCATORS
        for script in a.scripts
        for mode in ("full", "lora")
    ]
    config = {k: getattr(a, k) for k in ("rank", "batch_size", "k", "max_new_tokens", "threads", "tiny")}
    record = {
        "config": config, "machine": machine(), "versions": python_versions(a.python), "assets": assets,
        "floor_rss_mib": floors, "rows": rows,
    }  # fmt: skip
    text, md = render(record)
    print(text)
    if not a.tiny:
        print("written:", *write_results("lora_memory", record, md))


if __name__ == "__main__":
    main()
