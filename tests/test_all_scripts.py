"""Properties every algorithm script shares, checked on each of them."""

import importlib

import pytest

from conftest import tiny_args

SCRIPTS = ["rloo", "remax", "ppo", "grpo"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bf16_first_update_has_kl_exactly_zero(tmp_path, name, llama_dir, prompts_jsonl):
    """Under --bf16 the reference runs through the same numerics as the policy (fp32 weights under
    the same autocast), so before any update the two are the same function: KL exactly 0."""
    module = importlib.import_module(name)
    args = tiny_args(module, tmp_path, model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward",
                     total_episodes=16, bf16=True)
    metrics = module.main(args)
    assert metrics["objective/kl"] == 0.0
    assert metrics["val/ratio"] == 1.0 or name == "ppo"  # PPO's later epochs move the policy
