"""remax.py: the real functions against naive loops, and tiny end-to-end runs."""

import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

import remax
from conftest import assert_objective_is_per_response, run_cli, tiny_args


def _random_batch(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(1)  # right-padded rows of different lengths
    return torch.randn(B, T, generator=g, dtype=torch.float64), mask, lengths


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_matches_naive_loop(gamma):
    rewards, mask, lengths = _random_batch()
    rewards = rewards.masked_fill(~mask, 0.0)
    expected = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        for t in range(int(lengths[b])):
            expected[b, t] = sum(gamma ** (u - t) * rewards[b, u] for u in range(t, int(lengths[b])))
    assert_close(remax.reward_to_go(rewards, gamma), expected)


def test_rewards_put_the_score_gap_on_the_last_real_token():
    kl, mask, lengths = _random_batch()
    scores, baseline = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    rewards = remax.remax_rewards(kl, scores, baseline, mask, kl_coef=0.1, reward_clip=None)
    expected = (-0.1 * kl).masked_fill(~mask, 0.0)
    for b in range(5):
        expected[b, int(lengths[b]) - 1] += scores[b] - baseline[b]
    assert_close(rewards, expected)
    # with beta = 0 the advantage (return) at the last token is r(sample) - r(greedy), and every
    # earlier token sees the same undiscounted return
    returns = remax.reward_to_go(remax.remax_rewards(kl, scores, baseline, mask, 0.0, None), 1.0)
    for b in range(5):
        assert_close(returns[b, : int(lengths[b])], (scores[b] - baseline[b]).expand(int(lengths[b])))
    clipped = remax.remax_rewards(kl, scores * 100, baseline * 0, mask, 0.0, reward_clip=5.0)
    assert clipped.abs().max() <= 5.0


def test_loss_matches_naive_sum_and_gradient_vanishes_when_sample_is_greedy():
    torch.manual_seed(0)
    B, T, V = 4, 6, 9
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.arange(T) < torch.tensor([[6], [3], [1], [4]])
    logprobs = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    returns = torch.randn(B, T)
    loss = remax.policy_loss(logprobs, returns, mask, num_tokens=float(mask.sum()))
    naive = -sum(returns[b, t] * logprobs[b, t] for b in range(B) for t in range(T) if mask[b, t]) / mask.sum()
    assert_close(loss, naive)
    # sampled response == greedy response and beta = 0: zero reward everywhere, zero gradient
    kl = torch.randn(B, T)
    scores = torch.randn(B)
    rewards = remax.remax_rewards(kl, scores, scores.clone(), mask, kl_coef=0.0, reward_clip=None)
    loss = remax.policy_loss(logprobs, remax.reward_to_go(rewards, 1.0), mask, float(mask.sum()))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_main_two_updates(tmp_path, llama_dir, prompts_jsonl):
    args = tiny_args(remax, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward")
    metrics = remax.main(args)
    assert_objective_is_per_response(metrics, args.kl_coef)
    assert all(math.isfinite(v) for v in metrics.values())
    assert_close(torch.tensor(metrics["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert_close(torch.tensor(metrics["policy/approxkl"]), torch.tensor(0.0), atol=1e-8, rtol=0)
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [m["update"] for m in lines] == [1, 2]
    assert "objective/baseline_scores" in lines[0]
    assert "policy/clipfrac" not in lines[0] and "loss/value" not in lines[0]  # nothing is clipped, no critic


def test_main_reward_model_and_pad_equals_eos(tmp_path, gpt2_dir, gpt2_reward_dir, prompts_jsonl):
    args = tiny_args(
        remax, tmp_path, model=gpt2_dir, reward_model=gpt2_reward_dir, dataset=prompts_jsonl, reward_clip=5.0
    )
    metrics = remax.main(args)
    assert all(math.isfinite(v) for v in metrics.values())
    assert_close(torch.tensor(metrics["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_one_optimizer_step_per_batch(tmp_path, llama_dir, prompts_jsonl, monkeypatch):
    """ReMax is on-policy: no minibatch flag exists, and an update of 2 accumulated micro-batches
    steps the optimizer once (the ratio stays exactly 1 for the whole batch)."""
    assert (
        "num_minibatches" not in remax.Args.__dataclass_fields__ and "num_epochs" not in remax.Args.__dataclass_fields__
    )
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    args = tiny_args(
        remax, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward", total_episodes=16
    )
    metrics = remax.main(args)
    assert len(steps) == 1 and metrics["val/ratio"] == 1.0


def test_cli_subprocess_toy_task(tmp_path, toy_cache):
    out = run_cli("remax.py", tmp_path, toy_cache)
    assert "update 2/2" in out
    assert os.path.exists(tmp_path / "cli" / "config.json")
