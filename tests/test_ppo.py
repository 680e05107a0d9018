"""ppo.py: GAE, the clipped losses and tiny end-to-end runs."""

import math

import pytest
import torch
from torch.testing import assert_close

import ppo
from conftest import assert_objective_is_per_response, read_metrics, run_cli, tiny_args


def _padded_batch(B=6, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 3, 5, T - 1, 2])[:B]
    mask = torch.arange(T) < lengths.unsqueeze(1)  # right-padded rows of different lengths
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64).masked_fill(~mask, 0.0)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage on padding on purpose
    return rewards, values, mask, lengths


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_naive_loop(gamma, lam):
    rewards, values, mask, lengths = _padded_batch()
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b in range(rewards.shape[0]):
        L = int(lengths[b])
        v = [values[b, t].item() for t in range(L)] + [0.0]  # V = 0 after the last real token
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            expected = sum((gamma * lam) ** j * deltas[t + j] for j in range(L - t))
            assert_close(advantages[b, t].item(), expected)
            assert_close(returns[b, t].item(), expected + v[t])
        assert torch.all(advantages[b, L:] == 0)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_values():
    rewards, values, mask, _ = _padded_batch()
    advantages, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    assert_close(advantages, (reward_to_go - values).masked_fill(~mask, 0.0))


def test_rewards_put_the_score_on_the_last_real_token():
    kl, _, mask, lengths = _padded_batch()
    scores = torch.randn(6, dtype=torch.float64)
    rewards = ppo.ppo_rewards(kl, scores, mask, kl_coef=0.2)
    expected = (-0.2 * kl).masked_fill(~mask, 0.0)
    for b in range(6):
        expected[b, int(lengths[b]) - 1] += scores[b]
    assert_close(rewards, expected)


def test_clipped_loss_at_ratio_one_has_reinforce_gradient():
    torch.manual_seed(0)
    B, T, V = 5, 6, 10
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1))
    advantages = torch.randn(B, T)
    new = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    n = float(mask.sum())
    loss, ratio, clipped = ppo.policy_loss(new, new.detach(), advantages, mask, 0.2, n)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reinforce = -(advantages * new * mask).sum() / n
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert_close(grad, expected)
    assert_close(ratio, torch.ones(B, T))
    assert not clipped.any()


def test_clipped_policy_loss_stops_the_gradient_beyond_the_clip():
    new = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    old = torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, -1.0]])  # both moved beyond eps in the direction the advantage favours
    loss, _, clipped = ppo.policy_loss(new, old, advantages, torch.ones(1, 2, dtype=torch.bool), 0.2, 2.0)
    assert_close(loss, torch.tensor((-1.2 + 0.8) / 2))
    assert clipped.all()
    (grad,) = torch.autograd.grad(loss, new)
    assert_close(grad, torch.zeros(1, 2))


def test_value_clipping():
    old = torch.zeros(1, 3)
    returns = torch.tensor([[2.0, 2.0, 0.1]])
    new = torch.tensor([[1.0, 0.1, 0.5]], requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clipped = ppo.value_loss(new, old, returns, mask, cliprange_value=0.2, num_tokens=3.0)
    # token 0 moved 1.0 > 0.2 toward the return: the clipped prediction 0.2 gives the larger loss
    # token 1 moved 0.1 < 0.2: unclipped; token 2 moved past the return: clipped 0.2 is closer, unclipped wins
    expected = 0.5 * ((2.0 - 0.2) ** 2 + (2.0 - 0.1) ** 2 + (0.5 - 0.1) ** 2) / 3
    assert_close(loss, torch.tensor(expected))
    assert clipped.tolist() == [[True, False, False]]
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0, 0] == 0  # the clipped term does not depend on the prediction


def test_main_first_minibatch_ratio_one(tmp_path, llama_dir, prompts_jsonl):
    args = tiny_args(
        ppo,
        tmp_path,
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        num_minibatches=2,
        gradient_accumulation_steps=1,
    )
    seen = []
    original = ppo.policy_loss

    def spy(*a, **k):
        out = original(*a, **k)
        seen.append((out[1], a[3]))  # ratio and response mask
        return out

    ppo.policy_loss = spy
    try:
        metrics = ppo.main(args)
    finally:
        ppo.policy_loss = original
    assert all(math.isfinite(v) for v in metrics.values())
    ratio, mask = seen[0]  # first micro-batch of the first minibatch of the first epoch
    assert_close(ratio[mask], torch.ones(int(mask.sum())), atol=1e-5, rtol=0)
    assert len(seen) == 2 * 4 * 2  # updates x epochs x minibatches
    lines = read_metrics(tmp_path / "out" / "metrics.jsonl")
    for name in [
        "loss/value",
        "val/clipfrac",
        "val/vpred",
        "val/explained_variance",
        "policy/clipfrac",
        "policy/approxkl",
    ]:
        assert name in lines[0]


def test_main_one_epoch_is_on_policy(tmp_path, llama_dir, prompts_jsonl):
    args = tiny_args(
        ppo, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward", num_epochs=1
    )
    metrics = ppo.main(args)
    assert_objective_is_per_response(metrics, args.kl_coef)
    assert_close(torch.tensor(metrics["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert_close(torch.tensor(metrics["policy/approxkl"]), torch.tensor(0.0), atol=1e-8, rtol=0)
    assert metrics["policy/clipfrac"] == 0.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_main_reward_model_pad_equals_eos_and_explicit_value_model(
    tmp_path, gpt2_dir, gpt2_reward_dir, llama_reward_dir, prompts_jsonl
):
    args = tiny_args(ppo, tmp_path, model=gpt2_dir, reward_model=gpt2_reward_dir, dataset=prompts_jsonl, num_epochs=1)
    metrics = ppo.main(args)
    assert all(math.isfinite(v) for v in metrics.values())
    assert_close(torch.tensor(metrics["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)
    args = tiny_args(
        ppo,
        tmp_path,
        model=gpt2_dir,
        reward_model=gpt2_reward_dir,
        value_model=gpt2_reward_dir,
        dataset=prompts_jsonl,
        whiten_rewards=True,
        total_episodes=16,
        output_dir=str(tmp_path / "out2"),
    )
    assert all(math.isfinite(v) for v in ppo.main(args).values())


def test_cli_subprocess_toy_task(tmp_path, toy_cache):
    out = run_cli("ppo.py", tmp_path, toy_cache)
    assert "update 2/2" in out
