"""The built-in offline task: sort the letters of the prompt.

Prompt "qzbmx:" -> best response "bmqxz" then EOS. Reward = (positions that match the sorted
letters) / max(len(response), len(prompt letters)) + 0.1 if EOS was emitted, so 1.1 at best.
The starting policy is a tiny Llama fine-tuned on "prompt -> its letters in a random order": it
has learned the format but not the order (reward ~0.3), which is what RL must add.
Built once (about 20 s on 2 CPU cores) and cached on disk.
"""

from __future__ import annotations

import os
import random
import shutil
import string
import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # `datasets` is imported where it is used: a script's --help must not wait for it
    from datasets import Dataset

VERSION = "toy-sort-v2"  # v2: 2 heads of 32 (vLLM's CPU attention needs head_dim >= 32)
LETTERS = string.ascii_lowercase
SEPARATOR = ":"
MIN_LETTERS, MAX_LETTERS = 3, 6


def sort_reward(prompts: list, completions: list, eos: list, **columns) -> list:
    """One float per completion: matching positions / max(len(response), len(letters)) + 0.1 * EOS."""
    scores = []
    for prompt, completion, ended in zip(prompts, completions, eos):
        target = sorted(prompt.rstrip(SEPARATOR))
        matches = sum(a == b for a, b in zip(completion, target))
        scores.append(matches / max(len(completion), len(target)) + (0.1 if ended else 0.0))
    return scores


def random_prompt(rng: random.Random) -> str:
    """3 to 6 distinct lowercase letters in random order, then the separator."""
    return "".join(rng.sample(LETTERS, rng.randint(MIN_LETTERS, MAX_LETTERS))) + SEPARATOR


def toy_dataset(num_prompts: int = 8192, seed: int = 0):
    """The prompts, deterministic for a given seed."""
    rng = random.Random(seed)
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [random_prompt(rng) for _ in range(num_prompts)]})


def toy_eval_dataset(num_prompts: int = 512, seed: int = 1) -> Dataset:
    """Held-out prompts, drawn like toy_dataset()'s with another seed, keeping only those whose set of
    letters no training prompt holds (in any order), each set once: the training set is unchanged, and
    RL never trains on any of these sets of letters."""
    seen = {frozenset(p.rstrip(SEPARATOR)) for p in toy_dataset()["prompt"]}
    rng, prompts = random.Random(seed), []
    while len(prompts) < num_prompts:
        prompt = random_prompt(rng)
        if frozenset(prompt.rstrip(SEPARATOR)) not in seen:
            seen.add(frozenset(prompt.rstrip(SEPARATOR)))
            prompts.append(prompt)
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts})


def make_tokenizer():
    """A character-level tokenizer saved and loaded as a real Hugging Face tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, SEPARATOR: 2, **{c: 3 + i for i, c in enumerate(LETTERS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # join characters without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", padding_side="left")


def make_model(vocab_size: int = 32):
    """A tiny random Llama: hidden 64, 2 layers, 2 heads of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, steps: int, batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> list:
    """Supervised warm-up on "prompt -> letters in a random order + EOS", loss on the response only.
    Returns the loss curve."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    losses = []
    model.train()
    for _ in range(steps):
        prompts = [random_prompt(rng) for _ in range(batch_size)]
        answers = ["".join(rng.sample(p[:-1], len(p) - 1)) for p in prompts]
        prompt_ids = tokenizer(prompts)["input_ids"]
        full_ids = [p + tokenizer(a)["input_ids"] + [tokenizer.eos_token_id] for p, a in zip(prompt_ids, answers)]
        L = max(map(len, full_ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (L - len(x)) for x in full_ids])  # (B, L) right-padded
        labels = torch.tensor(
            [[-100] * len(p) + x[len(p) :] + [-100] * (L - len(x)) for p, x in zip(prompt_ids, full_ids)]
        )
        attention_mask = (labels != -100) | (torch.arange(L) < torch.tensor([len(p) for p in prompt_ids]).unsqueeze(1))
        loss = model(input_ids=input_ids, attention_mask=attention_mask.long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def cache_root() -> str:
    """$ONEFILE_RLHF_CACHE, else ~/.cache/onefile-rlhf."""
    return os.environ.get("ONEFILE_RLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "onefile-rlhf"))


def build_toy(root: str | None = None, steps: int = 600, print_fn=print) -> str:
    """Path of the warmed-up toy policy + tokenizer, built on first use. The build writes to a
    temporary folder renamed into place, so an interrupted build never leaves a half model."""
    path = os.path.join(root or cache_root(), VERSION)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    print_fn(f"building the toy task's starting policy in {path} (once, about 20 s)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.manual_seed(0)
    tokenizer, model = make_tokenizer(), make_model()
    losses = pretrain(model, tokenizer, steps)
    print_fn(f"toy warm-up: loss {losses[0]:.2f} -> {sum(losses[-50:]) / 50:.2f}")
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".building-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
