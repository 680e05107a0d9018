"""rloo.py: the real functions against naive loops, and tiny end-to-end runs."""

import math
import os
import subprocess
import sys

import torch
from torch.testing import assert_close

import rloo
from conftest import ROOT, assert_objective_is_per_response, read_metrics, run_cli, tiny_args


def test_advantages_match_naive_loop_and_sum_to_zero():
    torch.manual_seed(0)
    N, K = 5, 4
    rewards = torch.randn(N * K, dtype=torch.float64)
    expected = torch.empty_like(rewards)
    for n in range(N):
        for i in range(K):
            others = [rewards[n * K + j] for j in range(K) if j != i]
            expected[n * K + i] = rewards[n * K + i] - sum(others) / (K - 1)
    advantages = rloo.rloo_advantages(rewards, K)
    assert_close(advantages, expected)
    assert_close(advantages.view(N, K).sum(dim=1), torch.zeros(N, dtype=torch.float64))


def test_advantages_group_rows_in_repeat_interleave_order():
    # prompt n's samples are rows n*K..n*K+K-1: a constant reward per prompt gives zero advantage
    rewards = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 5.0])
    assert_close(rloo.rloo_advantages(rewards, 3), torch.zeros(6))


def test_kl_estimators():
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    assert_close(rloo.kl_per_token(logprobs, ref_logprobs, "k1"), logprobs - ref_logprobs)
    rho = torch.exp(ref_logprobs - logprobs)
    k3 = rloo.kl_per_token(logprobs, ref_logprobs, "k3")
    assert_close(k3, (rho - 1) - torch.log(rho))
    assert (k3 >= 0).all()


def test_loss_at_ratio_one_has_reinforce_gradient():
    torch.manual_seed(0)
    B, T = 6, 7
    logits = torch.randn(B, T, 11, requires_grad=True)
    labels = torch.randint(0, 11, (B, T))
    mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1))
    advantages = torch.randn(B)
    new = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss, ratio, clipped = rloo.policy_loss(new, new.detach(), advantages, mask, cliprange=0.2)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reinforce = -(advantages * (new * mask).sum(1)).mean()
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert_close(grad, expected)
    assert_close(ratio, torch.ones(B))
    assert not clipped.any()


def test_loss_clips_the_sequence_ratio():
    # ratio 2 with a positive advantage is clipped to 1.2: the loss stops depending on the policy
    new = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    old = torch.zeros(1, 2)
    mask = torch.tensor([[True, False]])
    loss, ratio, clipped = rloo.policy_loss(new, old, torch.tensor([1.0]), mask, cliprange=0.2)
    assert_close(loss, torch.tensor(-1.2))
    assert clipped.all()
    (grad,) = torch.autograd.grad(loss, new)
    assert_close(grad, torch.zeros(1, 2))


def test_main_two_updates_ratio_one(tmp_path, llama_dir, prompts_jsonl):
    args = tiny_args(rloo, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward")
    metrics = rloo.main(args)
    assert_objective_is_per_response(metrics, args.kl_coef)
    assert all(math.isfinite(v) for v in metrics.values())
    # one epoch, one minibatch: fully on-policy, so fp32 ratio is 1 and approx-KL is 0
    assert_close(torch.tensor(metrics["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert_close(torch.tensor(metrics["policy/approxkl"]), torch.tensor(0.0), atol=1e-8, rtol=0)
    assert metrics["policy/clipfrac"] == 0.0
    lines = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["update"] for m in lines] == [1, 2]
    for name in [
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "objective/entropy",
        "policy/approxkl",
        "policy/clipfrac",
        "loss/policy",
        "val/ratio",
        "val/num_eos_tokens",
        "time/episodes_per_second",
    ]:
        assert name in lines[0]
    assert "loss/value" not in lines[0]  # RLOO has no critic
    # the first update starts from the reference: KL exactly 0 (same weights, same forward)
    assert_close(torch.tensor(lines[0]["objective/kl"]), torch.tensor(0.0), atol=1e-5, rtol=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    assert os.path.isdir(tmp_path / "runs" / args.run_name)


def test_main_first_minibatch_ratio_one_with_several_minibatches(tmp_path, llama_dir, prompts_jsonl):
    args = tiny_args(
        rloo,
        tmp_path,
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        num_minibatches=2,
        gradient_accumulation_steps=1,
        num_epochs=2,
        total_episodes=16,
        learning_rate=1e-2,
    )
    ratios = []
    original = rloo.policy_loss

    def spy(*a, **k):
        out = original(*a, **k)
        ratios.append(out[1])
        return out

    rloo.policy_loss = spy
    try:
        metrics = rloo.main(args)
    finally:
        rloo.policy_loss = original
    assert len(ratios) == 4  # 2 epochs x 2 minibatches x 1 micro-batch
    assert_close(ratios[0], torch.ones_like(ratios[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(ratios[-1], torch.ones_like(ratios[-1]))  # later minibatches are off-policy
    assert math.isfinite(metrics["policy/approxkl"]) and metrics["policy/approxkl"] > 0


def test_main_reward_model_and_pad_equals_eos(tmp_path, gpt2_dir, gpt2_reward_dir, prompts_jsonl):
    args = tiny_args(
        rloo, tmp_path, model=gpt2_dir, reward_model=gpt2_reward_dir, dataset=prompts_jsonl, kl_estimator="k3"
    )
    metrics = rloo.main(args)
    assert all(math.isfinite(v) for v in metrics.values())
    assert_close(torch.tensor(metrics["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_main_missing_eos_penalty(tmp_path, llama_dir, prompts_jsonl):
    # one new token: a response can only end with EOS if it is the EOS itself
    args = tiny_args(
        rloo,
        tmp_path,
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        max_new_tokens=1,
        missing_eos_penalty=-3.0,
        total_episodes=16,
    )
    metrics = rloo.main(args)
    n_eos = metrics["val/num_eos_tokens"]
    assert n_eos < 16
    assert metrics["objective/scores"] <= (-3.0 * (16 - n_eos) + 0.1 * n_eos) / 16 + 1e-6


def test_cli_subprocess_toy_task(tmp_path, toy_cache):
    out = run_cli("rloo.py", tmp_path, toy_cache, "--print-samples-every", "1")
    assert "update 2/2" in out
    assert "completion" in out  # the sample table


def test_cli_help_documents_every_field():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "rloo.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for flag in [
        "--model",
        "--reward-model",
        "--reward-fn",
        "--dataset",
        "--prompt-column",
        "--max-prompt-length",
        "--max-new-tokens",
        "--temperature",
        "--num-generations",
        "--kl-coef",
        "--kl-estimator",
        "--learning-rate",
        "--lr-schedule",
        "--local-micro-batch-size",
        "--gradient-accumulation-steps",
        "--num-minibatches",
        "--total-episodes",
        "--seed",
        "--output-dir",
        "--bf16",
        "--track",
        "--missing-eos-penalty",
    ]:
        assert flag in out.stdout, flag
    assert "--world-size" not in out.stdout  # filled in at runtime, not a flag
