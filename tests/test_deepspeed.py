"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch`, one process on the CPU: the scripts make
two updates on the toy task with a config derived from configs/deepspeed_zero{2,3}.yaml.
The first ratio must be 1 and the first KL 0 (with --bf16 too: DeepSpeed casts the policy to bf16
instead of autocasting, and the reference must match), and under ZeRO-3 generation must run on
weights gathered once per rollout: a probe counts DeepSpeed's per-module fetches (the all-gathers its ZeRO-3 hooks make
before each module's forward) inside and outside `generate`.

Skipped where DeepSpeed is not installed (pip install -e '.[deepspeed]'). The first run on a
machine may spend ~30 s compiling DeepSpeed's CPU shared-memory op (cached afterwards)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from torch.testing import assert_close

from conftest import ROOT, read_metrics

pytest.importorskip("deepspeed")

MAX_NEW_TOKENS = 8

PROBE = """
import contextlib, importlib, json, os, sys
import tyro
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

sys.path.insert(0, {root!r})
module = importlib.import_module(sys.argv[1])
counts = {{"generate": 0, "fetches": 0, "fetches_in_generate": 0}}
real_fetch, real_generate = PartitionedParameterCoordinator.fetch_sub_module, module.generate

def counting_fetch(self, *args, **kwargs):
    counts["fetches"] += 1
    return real_fetch(self, *args, **kwargs)

def counting_generate(*args, **kwargs):
    counts["generate"] += 1
    before = counts["fetches"]
    try:
        return real_generate(*args, **kwargs)
    finally:
        counts["fetches_in_generate"] += counts["fetches"] - before

PartitionedParameterCoordinator.fetch_sub_module = counting_fetch
module.generate = counting_generate
if os.environ.get("PLANT_HOOKS_LEFT_IN"):  # gather, but leave the hooks to free and fetch again per module
    import deepspeed

    @contextlib.contextmanager
    def gather_only(model, accelerator):
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield accelerator.unwrap_model(model)

    module.unwrap_for_generation = gather_only
args = tyro.cli(module.Args, args=sys.argv[2:])
module.main(args)
with open(os.path.join(args.output_dir, "probe.json"), "w") as f:
    json.dump(counts, f)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, toy_cache, name, stage, *flags, **env_extra):
    """`accelerate launch` of the probed script with a one-process copy of the repository's config."""
    with open(os.path.join(ROOT, "configs", f"deepspeed_zero{stage}.yaml")) as f:
        config = yaml.safe_load(f)
    # use_cpu stays false: Accelerate turns DeepSpeed off when it is set. The CPU is chosen by hiding
    # GPUs from both Accelerate and DeepSpeed instead (the process group then uses gloo).
    config.update(num_processes=1, main_process_port=_free_port())
    config_file = tmp_path / f"zero{stage}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(root=ROOT))
    out = tmp_path / f"{name}-zero{stage}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), str(probe), name]
    sizes = ["--total-episodes", "32", "--local-micro-batch-size", "16", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", ONEFILE_RLHF_CACHE=toy_cache)
    cmd = launch + sizes + ["--output-dir", str(out), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**env, **env_extra})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["episode"] for m in metrics] == [16, 32]
    with open(out / "probe.json") as f:
        return metrics, json.load(f)


def assert_starts_on_policy_at_the_reference(metrics):
    """First update: the log-probs of the rollout and of the update come from the same forward on the
    same weights (bf16 or not), turned into log-probs in float32, so the ratio is 1 up to rounding: a
    few float32 ULPs of log-probs of order 1 per token, summed over at most MAX_NEW_TOKENS tokens
    (RLOO's sequence ratio). The reference starts as a copy of the policy run at its precision: KL 0."""
    atol = 4 * MAX_NEW_TOKENS * torch.finfo(torch.float32).eps
    assert_close(torch.tensor(metrics[0]["val/ratio"]), torch.tensor(1.0), atol=atol, rtol=0)
    assert_close(torch.tensor(metrics[0]["objective/kl"]), torch.tensor(0.0), atol=atol, rtol=0)


# ZeRO-2 leaves generation alone, so ReMax (RLOO's rollout twice) runs under ZeRO-3 only: ~10 s a run.
# With LoRA the reference is the engine's own module with its adapters off (no DeepSpeed engine of its own).
LORA = ["--lora-r", "4"]
CASES = [("rloo", 2, ["--bf16"]), ("ppo", 2, []), ("rloo", 3, []), ("remax", 3, ["--bf16"]), ("ppo", 3, [])]
CASES += [("grpo", 2, LORA), ("rloo", 3, LORA + ["--bf16"]), ("ppo", 3, LORA + ["--bf16"])]


@pytest.mark.parametrize("name,stage,flags", CASES, ids=[f"{n}-zero{s}{''.join(f)}" for n, s, f in CASES])
def test_deepspeed_two_updates(tmp_path, toy_cache, llama_reward_dir, name, stage, flags):
    # PPO scores with a reward model, which also starts its value model: the frozen reference and reward
    # models are then DeepSpeed inference engines (prepare_frozen; sharded under ZeRO-3), and the reward
    # model's backbone and head are called one by one (scalar_head_values). One epoch keeps PPO on-policy.
    if "--lora-r" in flags:
        pytest.importorskip("peft")
    if name == "ppo":
        flags = flags + ["--reward-model", llama_reward_dir, "--num-epochs", "1"]
    metrics, counts = _run(tmp_path, toy_cache, name, stage, *flags)
    assert_starts_on_policy_at_the_reference(metrics)
    assert counts["generate"] == (4 if name == "remax" else 2)  # per update one rollout (ReMax: sampled, greedy)
    if stage == 3:
        assert counts["fetches"] > 0  # the probe sees the ZeRO-3 hooks at work in the other forwards
        assert counts["fetches_in_generate"] == 0  # ... and none inside generate: gathered once, hooks lifted


def test_hooks_left_in_place_are_caught(tmp_path, toy_cache):
    """The probe is not vacuous: gathering without lifting the hooks fetches inside generate."""
    _, counts = _run(tmp_path, toy_cache, "rloo", 3, PLANT_HOOKS_LEFT_IN="1")
    assert counts["fetches_in_generate"] > 0
