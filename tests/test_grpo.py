"""grpo.py: the real functions against naive loops, and tiny end-to-end runs."""

import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from torch.testing import assert_close

import transformers
import grpo
from common.ops import INVALID_LOGPROB
from conftest import ROOT, assert_objective_is_per_response, read_metrics, run_cli, tiny_args

F32_EPS = torch.finfo(torch.float32).eps
# the same rows through two fp32 forwards in different micro-batches: log-probs (|log p| <~ 32) agree
# to a few ULPs, so a ratio exp(new - old) is 1 within 8 ULPs of 32
LOGPROB_TOL = 8 * 32 * F32_EPS


def _tol(dtype, scale=1.0, ulps=16):
    """atol and rtol of a few ULPs of the largest value compared."""
    eps = torch.finfo(dtype).eps
    return dict(atol=ulps * eps * max(float(scale), 1.0), rtol=ulps * eps)  # scale: a float or a 0-d tensor


# ---- Advantages ----


def _naive_advantages(scores: list, k: int, scale: str, eps: float = 1e-4) -> list:
    out = []
    for n in range(len(scores) // k):
        group = scores[n * k : (n + 1) * k]
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: the unbiased (K - 1) sample std
        for r in group:
            if len(set(group)) == 1:
                out.append(0.0)
            else:
                out.append((r - mean) / (std + eps) if scale == "group" else r - mean)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_advantages_match_naive_loop(scale, dtype):
    torch.manual_seed(0)
    N, K = 5, 3
    scores = torch.randn(N * K, dtype=torch.float64)
    scores[3:6] = 0.1  # a group of equal rewards: 0.1 + 0.1 + 0.1 is not 3 * 0.1 in floating point
    scores[9:12] = 7.0
    scores = scores.to(dtype)
    advantages, equal = grpo.grpo_advantages(scores, K, scale)
    expected = torch.tensor(_naive_advantages(scores.tolist(), K, scale), dtype=dtype)
    assert advantages.dtype == dtype and advantages.shape == (N * K,)
    assert torch.isfinite(advantages).all()
    # group scaling divides by a std of ~1 (+ 1e-4): rounding of the scores carries through at most x 1e4
    assert_close(advantages, expected, **_tol(dtype, expected.abs().max()))
    assert equal.tolist() == [False, True, False, True, False]
    assert (advantages[3:6] == 0).all() and (advantages[9:12] == 0).all()  # exactly 0, never NaN
    assert_close(advantages.view(N, K).sum(dim=1), torch.zeros(N, dtype=dtype), **_tol(dtype, 4 * K))


def test_advantages_group_rows_in_repeat_interleave_order():
    # rows n*K..n*K+K-1 are prompt n: each prompt's samples are ranked among themselves only
    scores = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    advantages, equal = grpo.grpo_advantages(scores, 3, "none")
    assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0]))
    advantages, equal = grpo.grpo_advantages(torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 5.0]), 3, "group")
    assert_close(advantages, torch.zeros(6))
    assert equal.tolist() == [True, True]


def test_advantages_scale_group_divides_by_the_unbiased_std():
    advantages, _ = grpo.grpo_advantages(torch.tensor([0.0, 2.0], dtype=torch.float64), 2, "group")
    std = math.sqrt(2.0)  # unbiased: ((1 + 1) / (2 - 1)) ** 0.5
    assert_close(advantages, torch.tensor([-1.0, 1.0], dtype=torch.float64) / (std + 1e-4))


# ---- Loss ----


def _batch(B=6, T=7, V=11, seed=0, dtype=torch.float64):
    """Log-probs from logits (so gradients flow to a leaf), right-padded rows, old and ref log-probs
    that differ from the policy enough to clip some tokens. Padding holds garbage on purpose."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 1, 3, 5, T - 1, 2])[:B]
    mask = torch.arange(T) < lengths.unsqueeze(1)
    new = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    old = (new.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).masked_fill(~mask, -1000.0)
    ref = (new.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)).masked_fill(~mask, 1000.0)
    advantages = torch.randn(B, generator=g, dtype=dtype)
    return logits, new, old, ref, advantages, mask, lengths


def _naive_loss(new, old, ref, advantages, lengths, cliprange, cliprange_high, kl_coef, normalization, num_tokens):
    """The paper's loss written token by token."""
    high = cliprange if cliprange_high is None else cliprange_high
    total, clipped = 0.0, []
    for i in range(len(advantages)):
        response = 0.0
        for t in range(int(lengths[i])):
            rho = torch.exp(new[i, t] - old[i, t])
            a = advantages[i]
            surrogate = torch.maximum(-a * rho, -a * torch.clamp(rho, 1 - cliprange, 1 + high))
            clipped.append(bool(-a * torch.clamp(rho, 1 - cliprange, 1 + high) > -a * rho))
            ref_ratio = torch.exp(ref[i, t] - new[i, t])  # pi_ref / pi
            k3 = ref_ratio - 1 - torch.log(ref_ratio)
            response = response + surrogate + kl_coef * k3
        total = total + (response / int(lengths[i]) if normalization == "response" else response)
    loss = total / len(advantages) if normalization == "response" else total / num_tokens
    return loss, clipped


@pytest.mark.parametrize(
    "normalization,cliprange_high", [("response", None), ("token", None), ("token", 0.28), ("constant", 0.28)]
)
def test_loss_gradient_matches_naive_loop(normalization, cliprange_high):
    logits, new, old, ref, advantages, mask, lengths = _batch()
    num_tokens = float(mask.sum()) if normalization == "token" else 7.0 * len(advantages)  # constant: T x responses
    args = (0.2, cliprange_high, 0.1, normalization, num_tokens)
    loss, ratio, clipped = grpo.policy_loss(new, old, ref, advantages, mask, *args)
    expected, expected_clipped = _naive_loss(new, old, ref, advantages, lengths, *args)
    assert 0 < sum(expected_clipped) < len(expected_clipped)  # some tokens clipped, not all
    assert clipped.tolist() == expected_clipped
    assert_close(ratio, torch.exp(new - old).detach()[mask])
    assert_close(loss, expected, **_tol(torch.float64, expected.detach().abs()))
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.isfinite(grad).all()  # exp(+-1000) on padding would overflow if not masked first
    assert_close(grad, expected_grad, **_tol(torch.float64, expected_grad.abs().max()))


@pytest.mark.parametrize("normalization", ["response", "token"])
def test_loss_at_ratio_one_without_kl_has_reinforce_gradient(normalization):
    logits, new, _, ref, advantages, mask, lengths = _batch()
    n = float(mask.sum())
    loss, ratio, clipped = grpo.policy_loss(new, new.detach(), ref, advantages, mask, 0.2, None, 0.0, normalization, n)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    # REINFORCE, -A_i grad log pi(y_i,t), weighted 1 / (|y_i| B) per token (response) or 1 / (all tokens) (token)
    weights = (
        1.0 / (lengths.unsqueeze(1).to(new.dtype) * len(lengths))
        if normalization == "response"
        else torch.full_like(new, 1.0 / n)
    )
    reinforce = -(advantages.unsqueeze(1) * new * weights * mask).sum()
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert_close(grad, expected, **_tol(torch.float64, expected.abs().max()))
    assert_close(ratio, torch.ones_like(ratio))
    assert not clipped.any()


def test_k3_term_is_zero_with_zero_gradient_when_policy_is_reference():
    logits, new, old, _, advantages, mask, _ = _batch()
    ref = new.detach().masked_fill(~mask, INVALID_LOGPROB)
    assert_close(grpo.kl_per_token(new, ref, "k3")[mask], torch.zeros(int(mask.sum()), dtype=new.dtype))
    for normalization in ["response", "token"]:
        common_args = (new, old, ref, advantages, mask, 0.2, None)
        with_kl, _, _ = grpo.policy_loss(*common_args, 0.5, normalization, float(mask.sum()))
        without_kl, _, _ = grpo.policy_loss(*common_args, 0.0, normalization, float(mask.sum()))
        assert_close(with_kl, without_kl, atol=0, rtol=0)
        (grad_with,) = torch.autograd.grad(with_kl, logits, retain_graph=True)
        (grad_without,) = torch.autograd.grad(without_kl, logits, retain_graph=True)
        assert_close(grad_with, grad_without, **_tol(torch.float64, grad_without.abs().max()))


def test_k3_gradient_pulls_towards_the_reference():
    # d/d log pi of k3 = 1 - pi_ref/pi: positive where pi > pi_ref, so descent lowers log pi there
    new = torch.tensor([[math.log(0.5), math.log(0.1)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.2)]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _, _ = grpo.policy_loss(
        new, new.detach(), ref, torch.zeros(1, dtype=torch.float64), mask, 0.2, None, 1.0, "token", 2.0
    )
    (grad,) = torch.autograd.grad(loss, new)
    assert_close(grad, torch.tensor([[(1 - 0.5) / 2, (1 - 2.0) / 2]], dtype=torch.float64))


@pytest.mark.parametrize("normalization", ["response", "token"])
def test_gradient_accumulation_is_exact(normalization):
    """Two micro-batches, each loss divided by the 2 accumulation steps (as accelerator.backward
    does) with num_tokens shared out as main() does, give the gradient of the whole minibatch."""
    logits, new, old, ref, advantages, mask, _ = _batch()
    loss_args = (0.2, 0.28, 0.1, normalization)
    whole, _, _ = grpo.policy_loss(new, old, ref, advantages, mask, *loss_args, float(mask.sum()))
    (expected,) = torch.autograd.grad(whole, logits, retain_graph=True)
    accumulated = torch.zeros_like(logits)
    for rows in (slice(0, 3), slice(3, 6)):  # token counts 11 and 13: a per-micro-batch mean would be wrong
        loss, _, _ = grpo.policy_loss(
            new[rows], old[rows], ref[rows], advantages[rows], mask[rows], *loss_args, float(mask.sum()) / 2
        )
        accumulated += torch.autograd.grad(loss / 2, logits, retain_graph=True)[0]
    assert_close(accumulated, expected, **_tol(torch.float64, expected.abs().max()))


# ---- End to end ----


def test_main_two_updates_ratio_one(tmp_path, llama_dir, prompts_jsonl):
    args = tiny_args(grpo, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward")
    metrics = grpo.main(args)
    assert args.kl_coef == 0.04 and args.scale_rewards == "group" and args.loss_normalization == "response"
    assert_objective_is_per_response(metrics, args.kl_coef)
    assert all(math.isfinite(v) for v in metrics.values())
    lines = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["update"] for m in lines] == [1, 2]
    # one epoch, one minibatch: fully on-policy, so the fp32 ratio is 1 and approx-KL 0, on every update
    for m in lines:
        assert_close(torch.tensor(m["val/ratio"]), torch.tensor(1.0), atol=LOGPROB_TOL, rtol=0)
        assert_close(torch.tensor(m["policy/approxkl"]), torch.tensor(0.0), atol=(LOGPROB_TOL) ** 2, rtol=0)
        assert m["policy/clipfrac"] == 0.0
        assert 0.0 <= m["val/zero_std_groups"] <= 1.0
    for name in [
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "objective/entropy",
        "policy/approxkl",
        "policy/clipfrac",
        "loss/policy",
        "val/ratio",
        "val/ratio_var",
        "val/num_eos_tokens",
        "val/response_length",
        "val/advantage_abs",
        "val/zero_std_groups",
        "lr",
        "episode",
        "val/skipped_batches",
        "time/episodes_per_second",
    ]:
        assert name in lines[0], name
    assert "loss/value" not in lines[0]  # GRPO has no critic
    # the first update starts from the reference: k3 exactly 0 (same weights, same forward)
    assert_close(torch.tensor(lines[0]["objective/kl"]), torch.tensor(0.0), atol=LOGPROB_TOL, rtol=0)
    assert lines[1]["objective/kl"] > 0  # the k3 term of the loss does not keep the policy at the reference


def test_main_first_minibatch_ratio_one_with_several_minibatches(tmp_path, llama_dir, prompts_jsonl, monkeypatch):
    args = tiny_args(
        grpo,
        tmp_path,
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        num_minibatches=2,
        gradient_accumulation_steps=1,
        num_epochs=2,
        total_episodes=16,
        learning_rate=1e-2,
        loss_normalization="token",
        cliprange_high=0.28,
    )
    ratios = []
    original = grpo.policy_loss

    def spy(*a, **k):
        out = original(*a, **k)
        ratios.append(out[1])
        return out

    monkeypatch.setattr(grpo, "policy_loss", spy)
    metrics = grpo.main(args)
    assert len(ratios) == 4  # 2 epochs x 2 minibatches x 1 micro-batch
    assert_close(ratios[0], torch.ones_like(ratios[0]), atol=LOGPROB_TOL, rtol=0)
    assert not torch.allclose(ratios[-1], torch.ones_like(ratios[-1]))  # later minibatches are off-policy
    assert math.isfinite(metrics["policy/approxkl"]) and metrics["policy/approxkl"] > 0


@pytest.mark.parametrize("normalization", ["token", "constant"])
def test_main_token_sums_are_shared_out_over_accumulation(
    tmp_path, llama_dir, prompts_jsonl, monkeypatch, normalization
):
    """Over the micro-batches of one minibatch, token count / num_tokens adds up to the accumulation
    steps that accelerator.backward divides by: each token weighs 1 / (the minibatch's tokens)."""
    args = tiny_args(
        grpo,
        tmp_path,
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        total_episodes=16,
        local_micro_batch_size=4,
        gradient_accumulation_steps=2,
        num_minibatches=2,
        loss_normalization=normalization,
    )
    seen = []
    original = grpo.policy_loss

    def spy(*a, **k):
        seen.append((int(a[4].sum()), float(a[9])))  # response tokens of the micro-batch, num_tokens
        return original(*a, **k)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    grpo.main(args)
    assert len(seen) == 4  # 2 minibatches x 2 micro-batches
    for first, second in (seen[0:2], seen[2:4]):
        assert first[1] == second[1]  # one divisor per minibatch
        if normalization == "token":
            assert_close((first[0] + second[0]) / first[1], 2.0, atol=0, rtol=4 * F32_EPS)
        else:  # Dr. GRPO: max_new_tokens x the minibatch's responses, shared out the same way
            assert first[1] == args.max_new_tokens * 8 / 2


@pytest.fixture
def model_loads(monkeypatch):
    """Every from_pretrained of a model is recorded and refused."""
    calls = []

    def refuse(name, *args, **kwargs):
        calls.append(name)
        raise AssertionError("model loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    return calls


@pytest.mark.parametrize("k", [1, 0])
def test_fewer_than_two_generations_refused_before_loading(tmp_path, llama_dir, prompts_jsonl, model_loads, k):
    args = tiny_args(
        grpo, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward", num_generations=k
    )
    with pytest.raises(ValueError, match=re.escape(f"--num-generations {k}")):
        grpo.main(args)
    assert model_loads == []


def test_cli_subprocess_toy_task_dapo_flags(tmp_path, toy_cache):
    out = run_cli(
        "grpo.py",
        tmp_path,
        toy_cache,
        "--print-samples-every",
        "1",
        "--scale-rewards",
        "none",
        "--loss-normalization",
        "token",
        "--cliprange-high",
        "0.28",
        "--kl-coef",
        "0",
    )
    assert "update 2/2" in out
    assert "completion" in out  # the sample table
    lines = read_metrics(tmp_path / "cli" / "metrics.jsonl")
    assert all(math.isfinite(v) for m in lines for v in m.values() if isinstance(v, float))


RUNTIME_FIELDS = {"world_size", "local_batch_size", "local_mini_batch_size", "batch_size", "num_updates", "run_name"}


def test_cli_help_documents_every_field():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "grpo.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # help lines wrap
    for field in fields(grpo.Args):
        flag = "--" + field.name.replace("_", "-")
        if field.name in RUNTIME_FIELDS:
            assert flag + " " not in text, flag  # filled in at runtime, not a flag
        else:
            assert flag in text, flag
    for doc in [
        "K, responses sampled per prompt (>= 2)",
        "(Dr. GRPO)",
        "(DAPO",
        "--loss-normalization {response,token,constant}",
        "--scale-rewards {group,none}",
    ]:
        assert doc in text, doc
    assert "--rloo-k" not in text and "--kl-estimator" not in text


def test_module_docstring():
    with open(os.path.join(ROOT, "grpo.py")) as f:
        docstring = re.match(r'"""(.*?)"""', f.read(), re.S).group(1)
    assert len(docstring.splitlines()) <= 25
    for needed in [
        "arXiv 2402.03300",
        "Differences from the paper",
        "Differences from rloo.py",
        "python grpo.py",
        "accelerate launch",
        "Dr. GRPO",
        "DAPO",
    ]:
        assert needed in docstring, needed
