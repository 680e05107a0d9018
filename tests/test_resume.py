"""Checkpoints: resuming is bit-exact, a crash while writing keeps the previous checkpoint, a signal
stops cleanly with a resume command, and non-finite values stop (or skip) a batch."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tiny_args


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def _weights(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).state_dict()


def _interrupt_after(module, monkeypatch, update):
    """Deliver SIGINT to ourselves while update `update` is being logged, as Ctrl-C would."""
    import common.run

    original = common.run.log_metrics

    def log_then_interrupt(trackers, metrics, step):
        original(trackers, metrics, step)
        if step == update:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(common.run, "log_metrics", log_then_interrupt)


@pytest.mark.parametrize("name, evaluate", [(n, False) for n in ("rloo", "remax", "ppo", "grpo")] + [("ppo", True)])
def test_resume_is_bit_exact(tmp_path, monkeypatch, name, evaluate, llama_dir, prompts_jsonl):
    """Also with --eval-every (prompts held out of --dataset, sampled answers): evaluated at 0, 2 and 4 either way."""
    module = importlib.import_module(name)
    common = dict(
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        total_episodes=64,
        gradient_accumulation_steps=1,
        local_micro_batch_size=16,
        print_samples_every=0,
        **(dict(eval_every=2, eval_samples=2, eval_max_prompts=8) if evaluate else {}),
    )
    module.main(tiny_args(module, tmp_path, output_dir=str(tmp_path / "straight"), **common))

    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:  # undoing it keeps the test's cwd
        _interrupt_after(module, patch, 2)
        module.main(tiny_args(module, tmp_path, output_dir=str(tmp_path / "resumed"), run_name="r", **common))
    assert stopped.value.code == 128 + signal.SIGINT
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["update-00000002"]
    module.main(tiny_args(module, tmp_path, output_dir=str(tmp_path / "resumed"), resume_from="latest", **common))

    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")  # updates 1..4, none twice
    if evaluate:
        assert [m["update"] for m in _metrics(tmp_path / "resumed") if "eval/scores" in m] == [0, 2, 4]


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, llama_dir, prompts_jsonl):
    import rloo
    from accelerate import Accelerator

    args = dict(
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        total_episodes=64,
        gradient_accumulation_steps=1,
        local_micro_batch_size=16,
        save_every=1,
        keep_last=2,
    )
    calls = {"n": 0}
    real_save_state = Accelerator.save_state

    def save_state_then_die(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(os.path.join(output_dir, "model.safetensors"), "w") as f:
                f.write("half a checkpoint")
            raise OSError("disk full")
        return real_save_state(self, output_dir, **kw)

    with (
        monkeypatch.context() as patch,
        pytest.raises(RuntimeError, match=r"checkpoint update 3 failed .*disk full.*update-00000002\) is intact"),
    ):
        patch.setattr(Accelerator, "save_state", save_state_then_die)
        rloo.main(tiny_args(rloo, tmp_path, **args))
    checkpoints = sorted(os.listdir(tmp_path / "out" / "checkpoints"))
    assert checkpoints == ["update-00000001", "update-00000002"]  # the half-written one is gone
    metrics = rloo.main(tiny_args(rloo, tmp_path, resume_from="latest", **args))  # loads update-2, runs 3 and 4
    assert metrics["episode"] == 64
    assert [m["update"] for m in _metrics(tmp_path / "out")] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["update-00000003", "update-00000004"]  # keep_last


def test_refuses_foreign_checkpoints_and_finished_runs(
    tmp_path, monkeypatch, llama_dir, gpt2_dir, gpt2_reward_dir, prompts_jsonl
):
    import remax
    import rloo

    args = dict(dataset=prompts_jsonl, total_episodes=32, local_micro_batch_size=16, gradient_accumulation_steps=1)
    rloo.main(tiny_args(rloo, tmp_path, model=llama_dir, reward_fn="common.toy:sort_reward", save_every=1, **args))
    checkpoint = str(tmp_path / "out" / "checkpoints" / "update-00000001")

    import transformers

    def no_loading(*a, **k):
        raise AssertionError("model loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(FileExistsError, match="finished run; pass --overwrite"):
        rloo.main(tiny_args(rloo, tmp_path, model=llama_dir, reward_fn="common.toy:sort_reward", **args))
    with pytest.raises(ValueError, match="checkpoint of rloo.py, not remax.py"):
        remax.main(
            tiny_args(
                remax, tmp_path, model=llama_dir, reward_fn="common.toy:sort_reward", resume_from=checkpoint, **args
            )
        )
    with pytest.raises(ValueError, match="model of shape"):
        rloo.main(
            tiny_args(rloo, tmp_path, model=gpt2_dir, reward_model=gpt2_reward_dir, resume_from=checkpoint, **args)
        )
    with pytest.raises(ValueError, match="also pass the --output-dir"):
        rloo.main(rloo.Args(model=llama_dir, reward_fn="common.toy:sort_reward", resume_from="latest", **args))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        rloo.main(
            tiny_args(
                rloo, tmp_path, model=llama_dir, reward_fn="common.toy:sort_reward", resume_from=str(tmp_path), **args
            )
        )


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_scores_stop_or_skip(tmp_path, monkeypatch, skip, llama_dir, prompts_jsonl):
    import rloo

    real = rloo.score_responses
    calls = {"n": 0}

    def nan_on_second_update(*a, **k):
        scores, completions = real(*a, **k)
        calls["n"] += 1
        return (scores * float("nan") if calls["n"] == 2 else scores), completions

    monkeypatch.setattr(rloo, "score_responses", nan_on_second_update)
    args = tiny_args(
        rloo,
        tmp_path,
        model=llama_dir,
        dataset=prompts_jsonl,
        reward_fn="common.toy:sort_reward",
        total_episodes=48,
        skip_nonfinite=skip,
    )
    if not skip:
        with pytest.raises(FloatingPointError, match="update 2: non-finite scores"):
            rloo.main(args)
        return
    metrics = rloo.main(args)
    assert metrics["val/skipped_batches"] == 1 and all(math.isfinite(v) for v in metrics.values())
    assert [m["update"] for m in _metrics(tmp_path / "out")] == [1, 3]


def test_ctrl_c_prints_a_resume_command_that_continues(tmp_path, toy_cache):
    env = {**os.environ, "ONEFILE_RLHF_CACHE": toy_cache}
    cmd = [
        sys.executable,
        os.path.join(ROOT, "ppo.py"),
        "--total-episodes",
        "6400",
        "--local-micro-batch-size",
        "16",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out[-2000:]
    stopped_at = int(out.split("stopped after update ")[1].split(";")[0])
    command = out.split("to continue: ")[1].splitlines()[0]
    assert "--resume-from latest" in command
    resumed = subprocess.run(
        command.replace("python ", f"{sys.executable} ", 1) + " --total-episodes " + str(16 * (stopped_at + 2)),
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and f"update {stopped_at + 1}/" in resumed.stdout
    assert [m["update"] for m in _metrics(tmp_path / "run")] == list(range(1, stopped_at + 3))
