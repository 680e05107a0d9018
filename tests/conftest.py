"""Tiny local models, saved with save_pretrained and loaded back through from_pretrained by the
code under test. Everything is offline and on CPU."""

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

from common import toy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """A toy-task cache with a briefly warmed-up policy, so main() with no --model starts at once.
    Also exported as ONEFILE_RLHF_CACHE for subprocesses."""
    root = str(tmp_path_factory.mktemp("toy-cache"))
    toy.build_toy(root, steps=30, print_fn=lambda *a: None)
    os.environ["ONEFILE_RLHF_CACHE"] = root
    return root


@pytest.fixture(scope="session")
def llama_dir(toy_cache):
    """The toy policy: a tiny Llama with a character tokenizer (pad 0, EOS 1)."""
    return os.path.join(toy_cache, toy.VERSION)


@pytest.fixture(scope="session")
def llama_reward_dir(tmp_path_factory):
    """A random Llama reward model (one scalar head) with the toy tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = str(tmp_path_factory.mktemp("llama-rm"))
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        num_labels=1,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    toy.make_tokenizer().save_pretrained(path)
    return path


def _gpt2_tokenizer():
    """The character tokenizer with no pad token and EOS "</s>": load_tokenizer sets pad = EOS, as for GPT-2."""
    from transformers import PreTrainedTokenizerFast

    backend = toy.make_tokenizer().backend_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (absolute position embeddings, dropout in its config) whose pad id == EOS id."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("gpt2"))
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=32, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    _gpt2_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_reward_dir(tmp_path_factory):
    """A tiny GPT-2 reward model sharing the pad == EOS tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    path = str(tmp_path_factory.mktemp("gpt2-rm"))
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=32, n_positions=64, n_embd=32, n_layer=1, n_head=2, eos_token_id=1, pad_token_id=1, num_labels=1
    )
    GPT2ForSequenceClassification(config).save_pretrained(path)
    _gpt2_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompts_jsonl(tmp_path_factory):
    """256 toy prompts in a .jsonl file, with an extra column `letters` for reward functions."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(256):
            p = toy.random_prompt(rng)
            f.write(json.dumps({"prompt": p, "letters": len(p) - 1}) + "\n")
    return str(path)


def tiny_args(module, tmp_path, **overrides):
    """Args of an algorithm script for a run of two small updates (16 responses each)."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        run_name=f"test-{module.__name__}",
        print_samples_every=0,
        max_new_tokens=6,
        local_micro_batch_size=8,
        gradient_accumulation_steps=2,
        total_episodes=32,
    )
    defaults.update(overrides)
    return module.Args(**defaults)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Each test runs in its own folder, so runs/ and output/ never land in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """main() installs SIGINT/SIGTERM handlers for a clean stop; give pytest its own back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process (mixed precision among it): each test starts afresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


def read_metrics(path):
    """A run's metrics.jsonl, one dict per update."""
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def run_cli(script, tmp_path, toy_cache, *flags):
    """A script through its real command line on the toy task, two updates of 16 responses; the output."""
    import subprocess

    cmd = [
        sys.executable,
        os.path.join(ROOT, script),
        "--total-episodes",
        "32",
        "--local-micro-batch-size",
        "16",
        "--output-dir",
        str(tmp_path / "cli"),
        *flags,
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "ONEFILE_RLHF_CACHE": toy_cache},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(read_metrics(tmp_path / "cli" / "metrics.jsonl")) == 2
    return out.stdout + out.stderr


def assert_objective_is_per_response(metrics, kl_coef):
    """objective/rlhf_reward = score - beta * summed KL per response (not a mean over token slots)."""
    from torch.testing import assert_close

    expected = metrics["objective/scores"] - kl_coef * metrics["objective/kl"]
    assert_close(torch.tensor(metrics["objective/rlhf_reward"]), torch.tensor(expected), atol=1e-6, rtol=1e-6)
