"""Held-out evaluation (common/evaluation.py), time per phase, and the plotting command.

The evaluation runs on prompts the policy never trains on, before training, every --eval-every
updates and after the last, and must not change training: the same run with and without it logs
the same training metrics and ends with the same weights."""

import importlib
import os

import pytest
import torch

from common import toy
from common.evaluation import load_eval_prompts, shard
from conftest import read_metrics, tiny_args

EVAL = dict(eval_every=2, eval_samples=2, eval_max_prompts=12)  # 3 updates: evaluated at 0, 2 and 3 (the end)


def _training(lines):
    return [{k: v for k, v in m.items() if not k.startswith(("eval/", "time/"))} for m in lines if m["update"] > 0]


def _weights(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).state_dict()


@pytest.mark.parametrize("name", ["rloo", "remax", "ppo", "grpo"])
def test_evaluation_does_not_change_training(tmp_path, name, toy_cache):
    """On the toy task (whose held-out prompts are a set of their own): evaluated at update 0, 2 and
    at the end (3), with greedy and sampled answers, and the training metrics and weights are those
    of the run without evaluation, bit for bit."""
    module = importlib.import_module(name)
    plain = module.main(tiny_args(module, tmp_path, output_dir=str(tmp_path / "plain"), total_episodes=48))
    evaluated = module.main(tiny_args(module, tmp_path, output_dir=str(tmp_path / "eval"), total_episodes=48, **EVAL))
    lines = read_metrics(tmp_path / "eval" / "metrics.jsonl")
    assert _training(lines) == _training(read_metrics(tmp_path / "plain" / "metrics.jsonl"))
    plain_weights, eval_weights = _weights(tmp_path / "plain"), _weights(tmp_path / "eval")
    assert all(torch.equal(plain_weights[k], eval_weights[k]) for k in plain_weights)

    assert [m["update"] for m in lines] == [0, 1, 2, 3]
    assert [m["update"] for m in lines if "eval/scores" in m] == [0, 2, 3]
    assert lines[0]["eval/kl"] == 0.0 and lines[0]["eval/sampled_kl"] == 0.0  # the starting policy is the reference
    assert lines[0]["eval/num_eos_tokens"] <= 12 and lines[0]["eval/sampled_num_eos_tokens"] <= 24
    assert lines[3]["eval/kl"] != 0.0 and lines[3]["time/eval"] > 0.0 and lines[1]["time/eval"] == 0.0
    assert evaluated["eval/scores"] == lines[3]["eval/scores"] and "eval/scores" not in plain
    for key in ("rollout", "score", "logprobs", "update", "elapsed", "generated_tokens_per_second"):
        assert lines[1][f"time/{key}"] > 0.0, key
    assert lines[1]["time/elapsed"] < lines[2]["time/elapsed"] < lines[3]["time/elapsed"]


def test_toy_held_out_prompts_share_no_letters_with_training():
    """No held-out toy prompt has the letters of a training prompt, in any order; the training set is
    the one toy runs have always used."""
    train = {frozenset(p.rstrip(toy.SEPARATOR)) for p in toy.toy_dataset()["prompt"]}
    held_out = toy.toy_eval_dataset()["prompt"]
    assert len(held_out) == 512 and held_out == toy.toy_eval_dataset()["prompt"]
    assert len({frozenset(p.rstrip(toy.SEPARATOR)) for p in held_out}) == 512
    assert not train & {frozenset(p.rstrip(toy.SEPARATOR)) for p in held_out}


def test_eval_fraction_is_held_out_of_the_dataset(tmp_path, llama_dir, prompts_jsonl):
    """Without --eval-dataset: a fixed --eval-fraction of --dataset is kept out of training (and every
    row repeating one of its prompts); with --eval-every 0 nothing is."""
    from common.data import load_prompt_dataset, tokenize_prompts

    tokenizer = toy.make_tokenizer()
    dataset = tokenize_prompts(load_prompt_dataset(prompts_jsonl, "train"), "prompt", tokenizer, 64, "drop")
    dataset = dataset.add_column("row", list(range(len(dataset))))
    args = tiny_args(importlib.import_module("rloo"), tmp_path, model=llama_dir, dataset=prompts_jsonl)
    args.eval_every, args.eval_max_prompts = 0, 0
    assert load_eval_prompts(args, tokenizer, dataset, 4, print_fn=lambda *a: None) == (dataset, None)
    args.eval_every = 5
    train, held_out = load_eval_prompts(args, tokenizer, dataset, 4, print_fn=lambda *a: None)
    assert len(held_out) == round(0.05 * len(dataset)) and not set(train["prompt"]) & set(held_out["prompt"])
    assert len(train) + len(held_out) == len(dataset)  # the 256 prompts are distinct
    assert train["row"] == sorted(train["row"])  # the training rows keep their order
    again, held_out_again = load_eval_prompts(args, tokenizer, dataset, 4, print_fn=lambda *a: None)
    assert held_out_again["row"] == held_out["row"]  # the same rows whatever the --seed
    with pytest.raises(ValueError, match="leaves 243 training prompts, fewer than the 250"):
        load_eval_prompts(args, tokenizer, dataset, 250, print_fn=lambda *a: None)


@pytest.mark.parametrize("num_prompts, processes", [(13, 2), (3, 4), (8, 4), (1, 1)])
def test_shards_cover_every_prompt_once_in_equal_counts(num_prompts, processes):
    shards = [shard(num_prompts, i, processes) for i in range(processes)]
    assert len({len(rows) for rows, _ in shards}) == 1  # collective generation: every process steps as often
    assert sorted(r for rows, valid in shards for r in rows[:valid]) == list(range(num_prompts))


def test_plot_writes_a_png(tmp_path, toy_cache):
    pytest.importorskip("matplotlib")
    import rloo
    from common.plot import main as plot

    rloo.main(tiny_args(rloo, tmp_path, total_episodes=32, eval_every=1, eval_max_prompts=8))
    out = tmp_path / "curves.png"
    plot([str(tmp_path / "out"), str(tmp_path / "out" / "metrics.jsonl"), "-o", str(out)])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 10_000


def test_resume_refuses_another_held_out_set(tmp_path, llama_dir, prompts_jsonl):
    """Held-out prompts are not trained on, so resuming with another --eval-fraction (or with --eval-every
    0) would train on other prompts: refused before anything is loaded."""
    import rloo

    args = dict(model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward", save_every=1)
    rloo.main(tiny_args(rloo, tmp_path, eval_every=1, eval_max_prompts=4, total_episodes=16, **args))
    os.remove(tmp_path / "out" / "finished.json")  # as if stopped after its checkpoint
    for change in (dict(eval_every=0), dict(eval_every=1, eval_fraction=0.1)):
        with pytest.raises(ValueError, match="held out 0.05 of --dataset for evaluation"):
            rloo.main(tiny_args(rloo, tmp_path, resume_from="latest", **args, **change))
    with pytest.raises(ValueError, match="--eval-fraction 1.0: must be in"):
        rloo.main(tiny_args(rloo, tmp_path, eval_every=1, eval_fraction=1.0, **args))


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from common.plot import main as plot

    (tmp_path / "metrics.jsonl").write_text('{"update": 1, "episode": 8, "objective/scores": 0.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match=r"pip install -e \".\[plot\]\""):
        plot([str(tmp_path / "metrics.jsonl"), "-o", str(tmp_path / "x.png")])
