"""Local models, tokenizers and prompt files for the benchmarks (nothing comes from a hub).

Run as a subprocess by the benchmark scripts, so that they themselves never import torch (their
peak RSS would otherwise be charged to every child they start, see bench/measure.py):

    python bench/assets.py toy  WORKDIR      # the toy policy, a reward model fitted to the rule, prompts
    python bench/assets.py big  WORKDIR [--hidden 768 --layers 12 --vocab 32000]

Each prints one JSON line with the paths it made. Everything is cached in WORKDIR by a key of
its settings, so a second run reuses it.
"""

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common.toy import LETTERS, SEPARATOR, build_toy, make_tokenizer, random_prompt, toy_dataset  # noqa: E402


def write_prompts(path: str, num_prompts: int = 8192) -> str:
    """The toy task's prompts as a .jsonl file with a "prompt" column (what --dataset reads)."""
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            for prompt in toy_dataset(num_prompts)["prompt"]:
                f.write(json.dumps({"prompt": prompt}) + "\n")
        os.rename(path + ".tmp", path)
    return path


# ---- toy: a reward model fitted to the sorting rule ----


def rule_score(prompt: str, response: str) -> float:
    """matching positions / max(len(response), len(letters)): common.toy.sort_reward without its
    EOS bonus, so that the score read at the last letter and the score read at the EOS agree (TRL's
    RLOO scores the decoded text, which has no EOS; ours and TRL's PPO read the EOS)."""
    target = sorted(prompt.rstrip(SEPARATOR))
    return sum(a == b for a, b in zip(response, target)) / max(len(response), len(target), 1)


def random_response(prompt: str, rng: random.Random) -> str:
    """Responses of every quality: sorted, partly sorted, shuffled, shortened, lengthened."""
    letters = list(prompt.rstrip(SEPARATOR))
    kind = rng.random()
    if kind < 0.25:
        out = sorted(letters)
    elif kind < 0.5:  # sorted with a few swaps
        out = sorted(letters)
        for _ in range(rng.randint(1, 2)):
            i, j = rng.randrange(len(out)), rng.randrange(len(out))
            out[i], out[j] = out[j], out[i]
    elif kind < 0.8:
        out = rng.sample(letters, len(letters))
    else:  # wrong length or foreign letters
        out = [rng.choice(LETTERS) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.15:
        out = out[: rng.randint(1, len(out))]
    return "".join(out)


def fit_reward_model(policy_path: str, out: str, steps: int = 500, batch_size: int = 128, seed: int = 0) -> dict:
    """A LlamaForSequenceClassification (num_labels=1) with the toy policy's architecture and
    tokenizer, regressed onto rule_score at the last response letter and at the EOS after it."""
    from transformers import AutoConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = make_tokenizer()
    config = AutoConfig.from_pretrained(policy_path)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))

    def make_batch(n):
        rows, targets, positions = [], [], []
        for _ in range(n):
            prompt = random_prompt(rng)
            response = random_response(prompt, rng)
            ids = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(ids)
            targets.append(rule_score(prompt, response))
            positions.append((len(ids) - 2, len(ids) - 1))  # the last letter and the EOS
        L = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (L - len(r)) for r in rows])  # right-padded
        mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        return input_ids, mask, torch.tensor(targets), torch.tensor(positions)

    model.train()
    for _ in range(steps):
        input_ids, mask, targets, positions = make_batch(batch_size)
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        values = model.score(hidden).squeeze(-1)  # (B, L)
        read = values.gather(1, positions)  # (B, 2)
        loss = ((read - targets.unsqueeze(1)) ** 2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():  # held-out fit
        input_ids, mask, targets, positions = make_batch(1024)
        values = model.score(model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state).squeeze(-1)
        read = values.gather(1, positions)
        rmse = ((read - targets.unsqueeze(1)) ** 2).mean().sqrt().item()
        corr = torch.corrcoef(torch.stack([read[:, 1], targets]))[0, 1].item()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    fit = {"heldout_rmse": round(rmse, 4), "heldout_corr_with_rule": round(corr, 4), "steps": steps}
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(fit, f)
    return fit


def toy_assets(workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    policy = build_toy(print_fn=lambda *a: print(*a, file=sys.stderr))  # cached in ~/.cache/onefile-rlhf
    rm = os.path.join(workdir, "toy-reward-model")
    if not os.path.exists(os.path.join(rm, "fit.json")):
        print("fitting the toy reward model to the sorting rule (once, ~20 s)", file=sys.stderr)
        fit_reward_model(policy, rm)
    with open(os.path.join(rm, "fit.json")) as f:
        fit = json.load(f)
    return {
        "policy": policy,
        "reward_model": rm,
        "prompts": write_prompts(os.path.join(workdir, "toy_prompts.jsonl")),
        "reward_model_fit": fit,
    }


# ---- big: random-weight models of >= 100M parameters ----


def make_big_tokenizer(vocab: int):
    """A word-level tokenizer that encodes text one character at a time (as the toy's) but has
    `vocab` ids: the toy's 29 plus filler tokens "<t123>", so the LM head and the logits have a
    realistic width while prompts stay the toy's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {"<pad>": 0, "</s>": 1, SEPARATOR: 2, **{c: 3 + i for i, c in enumerate(LETTERS)}}
    for i in range(len(ids), vocab):
        ids[f"<t{i}>"] = i
    backend = Tokenizer(models.WordLevel(ids, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", padding_side="left")


def big_assets(workdir: str, hidden: int, layers: int, vocab: int, intermediate: int | None = None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    intermediate = intermediate or 4 * hidden
    key = f"llama-h{hidden}-l{layers}-i{intermediate}-v{vocab}"
    policy, rm = os.path.join(workdir, key, "policy"), os.path.join(workdir, key, "reward-model")
    if not os.path.exists(os.path.join(rm, "config.json")):
        print(f"building random-weight {key} policy and reward model", file=sys.stderr)
        torch.manual_seed(0)
        tokenizer = make_big_tokenizer(vocab)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(policy)
        tokenizer.save_pretrained(policy)
        del model
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
        model.save_pretrained(rm)
        tokenizer.save_pretrained(rm)
        del model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(policy)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        n_policy = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        config.num_labels = 1
        n_rm = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    return {
        "policy": policy,
        "reward_model": rm,
        "prompts": write_prompts(os.path.join(workdir, "toy_prompts.jsonl")),
        "key": key,
        "policy_params": n_policy,
        "reward_model_params": n_rm,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["toy", "big"])
    parser.add_argument("workdir")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    a = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = toy_assets(a.workdir) if a.kind == "toy" else big_assets(a.workdir, a.hidden, a.layers, a.vocab)
    print(json.dumps(out))
