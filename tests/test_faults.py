"""Faults: what a run keeps when it is killed, signalled, resumed wrongly, out of disk, corrupted, or
doubled. Each test failed before the fix it guards (see the README's reliability section)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_metrics, tiny_args

TOY = dict(reward_fn="common.toy:sort_reward", gradient_accumulation_steps=1, local_micro_batch_size=16)


def _args(module, tmp_path, llama_dir, prompts_jsonl, **overrides):
    return tiny_args(module, tmp_path, model=llama_dir, dataset=prompts_jsonl, **{**TOY, **overrides})


def _snapshot(folder):
    """Every file below folder with its size and modification time (but the lock, which holds a PID)."""
    return {
        os.path.join(root, name): (
            os.path.getsize(os.path.join(root, name)),
            os.path.getmtime(os.path.join(root, name)),
        )
        for root, _, names in os.walk(folder)
        for name in names
        if name != ".lock"
    }


def test_metrics_file_keeps_finished_updates_while_a_resume_starts(tmp_path):
    """The resumed run rewrites metrics.jsonl without what came after its checkpoint; at no instant
    may the file on disk hold fewer finished updates (a kill then lost updates 1-15 for good)."""
    from common.tracking import close_tracking, init_tracking

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"update": u, "x": u}) + "\n" for u in range(1, 5)) + '{"update": 5, "x"'
    )  # torn
    trackers = init_tracking("r", {}, str(path), False, "", resume_update=2)
    assert [m["update"] for m in read_metrics(path)] == [1, 2]  # on disk now, before anything is flushed or closed
    close_tracking(trackers)


def test_resuming_a_finished_run_does_nothing(tmp_path, llama_dir, prompts_jsonl, capsys):
    import rloo

    rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, save_every=1))
    before = _snapshot(tmp_path / "out")
    with pytest.raises(SystemExit) as done:
        rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, resume_from="latest"))
    assert done.value.code == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert _snapshot(tmp_path / "out") == before  # nothing rewritten


def test_a_run_whose_every_batch_was_skipped_says_so(tmp_path, llama_dir, prompts_jsonl, monkeypatch):
    import rloo

    real = rloo.score_responses
    monkeypatch.setattr(rloo, "score_responses", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    with pytest.raises(FloatingPointError, match="every batch of updates 1-2 held non-finite values"):
        rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, skip_nonfinite=True))
    assert not (tmp_path / "out" / "finished.json").exists()


def test_a_signal_during_the_last_update_just_finishes(tmp_path, llama_dir, prompts_jsonl, monkeypatch):
    import common.run
    import rloo

    original = common.run.log_metrics

    def log_then_interrupt(trackers, metrics, step):
        original(trackers, metrics, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(common.run, "log_metrics", log_then_interrupt)
    metrics = rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl))  # returns: no SystemExit
    assert metrics["episode"] == 32
    assert (tmp_path / "out" / "finished.json").exists() and (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_with_another_batch_layout_or_process_count_is_refused(tmp_path, llama_dir, prompts_jsonl, monkeypatch):
    import rloo

    rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, save_every=1, total_episodes=48))
    os.remove(tmp_path / "out" / "finished.json")  # as if it had stopped after update 3
    checkpoint = sorted((tmp_path / "out" / "checkpoints").iterdir())[-1]
    resume = dict(resume_from="latest", total_episodes=64)
    with pytest.raises(ValueError, match="local_micro_batch_size 16 -> 8.*same number of processes"):
        rloo.main(
            _args(
                rloo,
                tmp_path,
                llama_dir,
                prompts_jsonl,
                local_micro_batch_size=8,
                gradient_accumulation_steps=2,
                **resume,
            )
        )
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "world_size": 2, "batch_size": 32}))
    with pytest.raises(ValueError, match=r"world_size 2 -> 1.*processes \(2\)"):
        rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, **resume))


def test_resume_command_names_the_launcher(monkeypatch):
    from argparse import Namespace

    from common.checkpoint import resume_command

    args = Namespace(output_dir="out")
    argv = ["rloo.py", "--seed", "3", "--output-dir", "old", "--overwrite"]
    for var in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command(argv, args) == "to continue: python rloo.py --seed 3 --output-dir out --resume-from latest"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert "(detected: torchrun, 2 process(es))" in resume_command(argv, args)
    assert "ACCELERATE_USE_CPU=1 torchrun <the same launch options> rloo.py --seed 3" in resume_command(argv, args)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert "accelerate launch <the same launch options> rloo.py" in resume_command(argv, args)


def test_a_full_disk_while_checkpointing_is_named_and_cleaned_up(tmp_path, llama_dir, prompts_jsonl, monkeypatch):
    import rloo
    from accelerate import Accelerator

    real_save_state, calls = Accelerator.save_state, {"n": 0}

    def save_state_until_full(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            (tmp_path / "out" / "checkpoints" / ".tmp-update-00000002" / "model.safetensors").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state_until_full)
    with pytest.raises(
        OSError, match=r"no space left on .*checkpoints: checkpoint update 2 not written; the last checkpoint"
    ):
        rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, save_every=1, total_episodes=48))
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["update-00000001"]  # no temporary folder left


def test_a_full_disk_at_the_final_save_leaves_no_finished_looking_folder(
    tmp_path, llama_dir, prompts_jsonl, monkeypatch
):
    import rloo
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save_config_then_fail(self, save_directory, **kw):
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 945984 vs 945876")

    with (
        monkeypatch.context() as patch,
        pytest.raises(OSError, match="no space left on .*the trained policy was not saved"),
    ):
        patch.setattr(PreTrainedModel, "save_pretrained", save_config_then_fail)
        rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, save_every=1))
    out = tmp_path / "out"
    assert (
        not (out / "config.json").exists()
        and not (out / "finished.json").exists()
        and not (out / ".tmp-final").exists()
    )
    assert sorted(os.listdir(out / "checkpoints")) == ["update-00000001", "update-00000002"]
    assert real is PreTrainedModel.save_pretrained
    metrics = rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, resume_from="latest"))  # saves, trains nothing
    assert metrics["episode"] == 32 and (out / "finished.json").exists()
    assert [m["update"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("damage", ["flip a byte of the weights", "truncate an RNG state"])
def test_a_damaged_checkpoint_is_refused_with_the_one_before(tmp_path, llama_dir, prompts_jsonl, damage):
    import rloo

    rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, save_every=1, total_episodes=48))
    os.remove(tmp_path / "out" / "finished.json")
    latest = tmp_path / "out" / "checkpoints" / "update-00000003"
    if damage.startswith("flip"):
        path = latest / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
        name = "model.safetensors"
    else:
        path = next(latest.glob("random_states_*.pkl"))
        path.write_bytes(path.read_bytes()[:20])
        name = path.name
    with pytest.raises(
        ValueError, match=rf"checkpoint .*update-00000003: {name} does not match its checksum.*update-00000002"
    ):
        rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl, resume_from="latest", total_episodes=64))


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, llama_dir, prompts_jsonl):
    import rloo

    (tmp_path / "out").mkdir()
    hold = (  # another run: holds the lock with its PID in it
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0);"
        " f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "out" / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another run \(PID {holder.pid}\)"):
            rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl))
    finally:
        holder.kill()
        holder.wait()
    rloo.main(_args(rloo, tmp_path, llama_dir, prompts_jsonl))  # the lock died with its holder


def _start(cmd, tmp_path, toy_cache, launcher=()):
    env = {**os.environ, "ONEFILE_RLHF_CACHE": toy_cache, "OMP_NUM_THREADS": "1"}
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.Popen([*launcher, *cmd], cwd=tmp_path, env=env, start_new_session=True, **out)


def _wait_for_updates(path, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)


def test_sigterm_to_the_accelerate_launcher_checkpoints_the_training_process(tmp_path, toy_cache):
    """A scheduler signals the launcher; the training process must hear of it and checkpoint."""
    script = [
        os.path.join(ROOT, "rloo.py"),
        "--total-episodes",
        "64000",
        "--local-micro-batch-size",
        "16",
        "--output-dir",
        "run",
    ]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = _start(script, tmp_path, toy_cache, launcher=(accelerate, "launch", "--num_processes", "1", "--cpu"))
    _wait_for_updates(tmp_path / "run" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as `kill <pid>` would
    out, _ = proc.communicate(timeout=120)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "run").glob("checkpoints/update-*")):
        time.sleep(0.5)
    assert list((tmp_path / "run").glob("checkpoints/update-*")), out[-3000:]
    time.sleep(2)
    orphans = subprocess.run(
        ["pgrep", "-f", f"{tmp_path}.*rloo.py|rloo.py.*--output-dir run"], capture_output=True, text=True
    )
    assert str(tmp_path) not in orphans.stdout


def test_a_second_signal_stops_at_once_without_a_traceback(tmp_path, toy_cache):
    script = [sys.executable, os.path.join(ROOT, "ppo.py"), "--total-episodes", "64000", "--output-dir", "run"]
    proc = _start(script, tmp_path, toy_cache)
    _wait_for_updates(tmp_path / "run" / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    seen = []
    for line in proc.stdout:  # two signals sent together would arrive as one: wait until the first is handled
        seen.append(line)
        if "finishing this update" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out and "again: stopping without a checkpoint" in out


def test_the_saved_tokenizer_pads_on_the_left(tmp_path, gpt2_dir, gpt2_reward_dir, prompts_jsonl):
    """The trained policy is saved with the tokenizer it was trained with: left padding for generation."""
    import rloo
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(gpt2_dir).padding_side == "right"  # the starting model pads on the right
    rloo.main(tiny_args(rloo, tmp_path, model=gpt2_dir, reward_model=gpt2_reward_dir, dataset=prompts_jsonl))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").padding_side == "left"
