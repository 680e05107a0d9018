"""Two CPU processes (gloo, through torchrun) must make the same update as one process on the same
global batch: same prompts, same responses, same parameters afterwards, same logged metrics.

Sampling is seeded per process, so the responses of a 2-process run differ from those of a
1-process run. To compare the updates, `generate` is replaced by a function whose output depends
only on the prompt and its copy index (k-th sample of that prompt). And because Adam's step hardly
depends on the scale of the gradient (a loss twice too large on two processes would pass), the
optimizer is swapped for plain SGD with clipping off, so the parameter change is -lr * gradient.
Everything else is the real script: data sharding, rollout forwards, scoring, advantages,
whitening, loss normalisation, gradient accumulation, DDP's averaging and the metrics gathering."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from conftest import ROOT

LAUNCHER = """
import json, os, sys, zlib
import torch
sys.path.insert(0, {root!r})
import importlib
name, model, dataset, out, micro = sys.argv[1:6]
module = importlib.import_module(name)

def fixed_generate(model, queries, query_mask, config, synced=False, engine=None):
    rows, copies = [], {{}}
    for q, m in zip(queries, query_mask):
        prompt = tuple(q[m].tolist())
        k = copies.get(prompt, 0)
        copies[prompt] = k + 1
        g = torch.Generator().manual_seed(zlib.crc32(repr((prompt, k, config.do_sample)).encode()))
        row = torch.randint(3, 29, (config.max_new_tokens,), generator=g)  # letters of the toy vocabulary
        stop = int(torch.randint(1, config.max_new_tokens + 2, (1,), generator=g))
        if stop <= config.max_new_tokens:
            row[stop - 1] = config.eos_token_id  # the rest is truncated by the script; past the end: no EOS
        rows.append(row)
    return torch.stack(rows).to(queries.device)

module.generate = fixed_generate
import common.evaluation
common.evaluation.generate = fixed_generate  # the held-out evaluation's answers too
if os.environ.get("PLANT_DOUBLE_GRADIENT") and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # a planted scaling bug
    from accelerate import Accelerator
    real_backward = Accelerator.backward
    Accelerator.backward = lambda self, loss, **kw: real_backward(self, 2 * loss, **kw)
class PlainSGD(torch.optim.SGD):  # a class, so that libraries subclassing AdamW at import still load
    def __init__(self, params, lr, **unused):
        super().__init__(params, lr=lr)

torch.optim.AdamW = PlainSGD
args = module.Args(model=model, dataset=dataset, reward_fn="common.toy:sort_reward", output_dir=out, run_name="dist",
                   local_micro_batch_size=int(micro), gradient_accumulation_steps=2, total_episodes=16,
                   max_new_tokens=6, print_samples_every=0, learning_rate=1.0, max_grad_norm=1e9,
                   **json.loads(os.environ.get("EXTRA_ARGS", "{{}}")))
module.main(args)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, model, dataset, processes, **env_extra):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER.format(root=ROOT))
    out = tmp_path / f"{name}-{processes}"
    micro = str(8 // processes)  # 2 accumulation steps x 8 // processes x processes = 16 responses per update
    prefix = [sys.executable]
    if processes > 1:
        prefix += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
        ]
    # ACCELERATE_USE_CPU: else Accelerate ignores torchrun on CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **env_extra}
    result = subprocess.run(
        prefix + [str(launcher), name, model, dataset, str(out), micro],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(out / "metrics.jsonl") as f:
        return out, [json.loads(line) for line in f]


def assert_same_update(start: dict, after_one: dict, after_two: dict) -> None:
    """The parameter changes of the 1- and 2-process runs agree. The changes are differences of fp32
    weights, so each is exact only to the rounding of the weights themselves: the tolerance is a few
    ULPs of the largest weight of the tensor, plus a relative 1e-4 for the summation order."""
    moved = max((after_one[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the update did something, so agreeing is not trivial
    for key in start:
        scale = max(start[key].abs().max().item(), after_one[key].abs().max().item())
        atol = 4 * torch.finfo(torch.float32).eps * scale
        assert_close(after_two[key] - start[key], after_one[key] - start[key], atol=atol, rtol=1e-4, msg=key)


def _weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("name", ["rloo", "remax", "ppo", "grpo"])
def test_two_processes_match_one(tmp_path, name, llama_dir, prompts_jsonl):
    """Also the held-out evaluation before and after the update: 13 prompts, so the second process
    answers one padding prompt that must not count, greedy and 2 sampled answers each."""
    evaluation = dict(eval_every=1, eval_dataset=prompts_jsonl, eval_max_prompts=13, eval_samples=2)
    env = {"EXTRA_ARGS": json.dumps(evaluation)}
    one_dir, one = _run(tmp_path, name, llama_dir, prompts_jsonl, 1, **env)
    two_dir, two = _run(tmp_path, name, llama_dir, prompts_jsonl, 2, **env)
    assert_same_update(_weights(llama_dir), _weights(one_dir), _weights(two_dir))
    assert [m["update"] for m in one] == [m["update"] for m in two] == [0, 1]
    assert "eval/sampled_scores" in one[0] and "eval/scores" in one[1]
    for one_line, two_line in zip(one, two):
        assert one_line.keys() == two_line.keys()
        for key in one_line:
            if not key.startswith("time/"):
                assert_close(torch.tensor(two_line[key]), torch.tensor(one_line[key]), atol=1e-5, rtol=1e-4, msg=key)


def test_two_processes_match_one_with_lora(tmp_path, llama_dir, prompts_jsonl):
    """PPO with LoRA on the policy and the value model (frozen weights under DDP); compared on the
    merged policies: base + (alpha / r) B A."""
    pytest.importorskip("peft")
    env = {"EXTRA_ARGS": json.dumps(dict(lora_r=4, merge_lora=True))}
    one_dir, one = _run(tmp_path, "ppo", llama_dir, prompts_jsonl, 1, **env)
    two_dir, two = _run(tmp_path, "ppo", llama_dir, prompts_jsonl, 2, **env)
    assert_same_update(_weights(llama_dir), _weights(one_dir), _weights(two_dir))
    for key in ("loss/policy", "loss/value", "objective/kl", "val/ratio"):
        assert_close(torch.tensor(two[-1][key]), torch.tensor(one[-1][key]), atol=1e-5, rtol=1e-4, msg=key)


def test_a_gradient_twice_too_large_on_two_processes_fails(tmp_path, llama_dir, prompts_jsonl):
    """The tolerance above is loose enough for rounding, tight enough for a scaling bug."""
    one_dir, _ = _run(tmp_path, "rloo", llama_dir, prompts_jsonl, 1)
    two_dir, _ = _run(tmp_path, "rloo", llama_dir, prompts_jsonl, 2, PLANT_DOUBLE_GRADIENT="1")
    with pytest.raises(AssertionError):
        assert_same_update(_weights(llama_dir), _weights(one_dir), _weights(two_dir))
