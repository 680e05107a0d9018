"""--vllm (common/vllm_engine.py): vLLM samples the rollouts, the algorithm is unchanged.

Skipped where vLLM is not installed; it needs its own environment (vLLM pins transformers < 5.20):
.ci/run builds one and runs this file there (see the README's "Fast rollouts"). On CPU, vLLM's
attention needs head_dim >= 32: the toy policy has 2 heads of 32. Each engine takes ~15-30 s to
start, so the tests build few."""

import importlib
import os

import pytest
import torch
from torch.testing import assert_close

from conftest import read_metrics, tiny_args

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for the toy, and CI's memory

from common.models import load_policy, load_tokenizer  # noqa: E402
from common.ops import response_logits, selective_log_softmax  # noqa: E402
from common.rollout import generate, generation_config, truncate_at_eos  # noqa: E402
from common.vllm_engine import VLLMEngine, close_engines  # noqa: E402

SCRIPTS = ["rloo", "remax", "ppo", "grpo"]
EPS = torch.finfo(torch.float32).eps
# fp32 log-probs of the same weights through vLLM's kernels and transformers': they differ in the
# order of their sums only, a few hundred ULPs of the logits at most (measured: ~5e-7 on the toy).
SAME_WEIGHTS = 1e-4


def _vllm_args(module, tmp_path, **overrides):
    return tiny_args(module, tmp_path, vllm=True, vllm_gpu_memory_utilization=0.1, **overrides)


@pytest.fixture
def run(tmp_path, llama_dir, prompts_jsonl):
    """main() of a script with --vllm on the toy prompts and rule; its metrics. tiny_args' sizes unless overridden."""

    def run(name, **overrides):
        module = importlib.import_module(name)
        toy = dict(model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward")
        args = _vllm_args(module, tmp_path, **{**toy, **overrides})
        module.main(args)
        return read_metrics(os.path.join(args.output_dir, "metrics.jsonl"))

    return run


@pytest.fixture
def engine(llama_dir):
    """An engine on the toy policy, shut down after the test."""
    from accelerate import Accelerator

    module = importlib.import_module("rloo")
    engine = VLLMEngine(module.Args(model=llama_dir, vllm=True, vllm_gpu_memory_utilization=0.1), Accelerator())
    yield engine
    close_engines()


def _queries(tokenizer, n=12):
    from common.toy import random_prompt
    import random

    rng = random.Random(0)
    prompts = [tokenizer(random_prompt(rng))["input_ids"] for _ in range(n)]
    P = max(len(p) for p in prompts)
    queries = torch.tensor([[tokenizer.pad_token_id] * (P - len(p)) + p for p in prompts])  # left-padded
    return queries, queries != tokenizer.pad_token_id


def test_greedy_and_sampled_responses_match_transformers(engine, llama_dir):
    """Greedy vLLM responses equal greedy generate() token for token in fp32, before and after the
    engine gets new weights; sampled responses stop at the first EOS and are padded after it, and
    vLLM's log-probs of them are the recomputed ones at the sampling temperature."""
    tokenizer, policy = load_tokenizer(llama_dir), load_policy(llama_dir)
    queries, query_mask = _queries(tokenizer)
    greedy = generation_config(tokenizer, 8, 1.0, greedy=True)
    before = None
    for step in range(2):
        if step:  # new weights: the engine must follow them
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn_like(p) * 0.3 * p.std().nan_to_num(0.02))
        engine.load_weights(policy)
        expected = generate(policy, queries, query_mask, greedy)
        got = generate(policy, queries, query_mask, greedy, engine=engine)
        expected, got = (truncate_at_eos(r, tokenizer.eos_token_id, tokenizer.pad_token_id)[0] for r in (expected, got))
        assert torch.equal(got, expected[:, : got.shape[1]]) and (expected[:, got.shape[1] :] == 0).all()
        assert before is None or not torch.equal(got, before)  # the new weights answer differently
        before = got

    sampled = generation_config(tokenizer, 8, 0.7)
    responses = generate(policy, queries, query_mask, sampled, engine=engine)
    assert responses.shape[1] <= 8
    truncated, response_mask, has_eos = truncate_at_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(truncated, responses)  # nothing after the first EOS but padding
    assert has_eos.any()
    with torch.no_grad():
        logits = response_logits(
            policy, torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1), responses.shape[1]
        )
        logprobs = selective_log_softmax(logits, responses, 0.7)
    assert_close(engine.logprobs[response_mask], logprobs[response_mask], atol=SAME_WEIGHTS, rtol=0)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_train_with_vllm(run, name):
    """Three updates: the first ratio is exactly 1 (log-probs recomputed by the training forward), and
    every update's rollout_logprob_diff is rounding only: the engine held each update's weights."""
    metrics = run(name, total_episodes=48, learning_rate=1e-2)
    assert len(metrics) == 3
    if name != "ppo":  # PPO's 4 epochs move the policy within the update
        assert metrics[0]["val/ratio"] == 1.0
    assert metrics[-1]["objective/kl"] > 0  # the policy moved away from the reference
    for m in metrics:
        assert 0 <= m["val/rollout_logprob_diff"] < SAME_WEIGHTS, m["update"]


def test_logprob_diff_grows_when_the_weights_are_not_synced(run, monkeypatch):
    """The check does its job: with the weight sync skipped after the first rollout, the engine keeps
    sampling from the starting policy and the diff grows far beyond rounding."""
    loaded = []

    def load_once(self, policy, real=VLLMEngine.load_weights):
        if not loaded:
            loaded.append(True)
            real(self, policy)

    monkeypatch.setattr(VLLMEngine, "load_weights", load_once)
    metrics = run("rloo", total_episodes=64, learning_rate=1e-2)
    diffs = [m["val/rollout_logprob_diff"] for m in metrics]
    assert diffs[0] < SAME_WEIGHTS  # the first rollout had the right weights
    assert min(diffs[1:]) > 100 * SAME_WEIGHTS, diffs


def test_lora_merged_weights_reach_the_engine(run):
    """With --lora-r the engine gets the merged weights W + (alpha / r) B A before each rollout."""
    pytest.importorskip("peft")
    metrics = run("grpo", total_episodes=48, learning_rate=3e-2, lora_r=4)
    assert metrics[-1]["objective/kl"] > 0
    for m in metrics:
        assert 0 <= m["val/rollout_logprob_diff"] < SAME_WEIGHTS, m["update"]


def test_resume_is_bit_exact(run, tmp_path):
    """vLLM samples with the process's torch RNG, which checkpoints save: a run resumed at update 2
    ends with the weights of the straight run, bit for bit."""
    from transformers import AutoModelForCausalLM

    common = dict(total_episodes=64)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run("rloo", output_dir=straight, save_every=2, **common)
    checkpoint = os.path.join(straight, "checkpoints", "update-00000002")
    run("rloo", output_dir=resumed, resume_from=checkpoint, **common)
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (straight, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_processes_each_with_an_engine(tmp_path, toy_cache):
    """torchrun with two CPU processes: one engine per process (vLLM's external_launcher), each fed
    its own process's weights; every update's diff is rounding only."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(ROOT, "rloo.py")]
    cmd += [
        "--vllm",
        "--vllm-gpu-memory-utilization",
        "0.1",
        "--total-episodes",
        "96",
        "--local-micro-batch-size",
        "16",
    ]
    cmd += ["--output-dir", str(out), "--print-samples-every", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "ONEFILE_RLHF_CACHE": toy_cache}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert len(metrics) == 3 and metrics[0]["val/ratio"] == 1.0
    for m in metrics:
        assert 0 <= m["val/rollout_logprob_diff"] < SAME_WEIGHTS, m["update"]
