"""Resumable checkpoints, the output-directory guard, and stopping cleanly on SIGINT/SIGTERM.

A checkpoint is Accelerate's save_state (models, optimizer, every process's RNG states, and the
registered LR scheduler) plus `state.json` (algorithm, update, run name, model shape). It is written
to a hidden temporary folder and renamed into place, so a crash mid-write leaves the previous
checkpoint as it was. The data order needs no state: epoch e's order is a function of (seed, e).
"""

import json
import os
import re
import shlex
import shutil
import signal

import torch

MODEL_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "n_embd", "n_layer")


def model_shape(config) -> dict:
    """The fields of a model config that decide its parameter shapes."""
    return {k: getattr(config, k) for k in MODEL_SHAPE_KEYS if getattr(config, k, None) is not None}


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list:
    """Finished checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    names = [n for n in os.listdir(root) if re.fullmatch(r"update-\d+", n)] if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names)]


def check_output_dir(output_dir: str, resume_from, overwrite: bool) -> None:
    """Refuse to write over a finished run (or to restart an unfinished one) unless asked. With
    --overwrite the old checkpoints go, so that `latest` can never pick one of them."""
    if resume_from is not None:
        return
    if overwrite:
        shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)
        return
    if os.path.exists(os.path.join(output_dir, "config.json")):
        raise FileExistsError(f"--output-dir {output_dir} holds a finished run; pass --overwrite to replace it, or choose another directory")
    if list_checkpoints(output_dir):
        raise FileExistsError(
            f"--output-dir {output_dir} holds checkpoints of an unfinished run; pass --resume-from latest to continue it, "
            "or --overwrite to start again"
        )


def find_checkpoint(resume_from: str, output_dir: str, algorithm: str, shape: dict) -> tuple:
    """Resolve --resume-from (a checkpoint directory, or 'latest' in <output dir>/checkpoints) and check
    that it belongs to this algorithm and this model shape. Returns (path, state)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume-from latest: no checkpoint in {checkpoint_dir(output_dir)} (pass the --output-dir of the run)")
        resume_from = found[-1]
    state_file = os.path.join(resume_from, "state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"--resume-from {resume_from}: not a checkpoint (no state.json)")
    with open(state_file) as f:
        state = json.load(f)
    if state["algorithm"] != algorithm:
        raise ValueError(f"--resume-from {resume_from} is a checkpoint of {state['algorithm']}.py, not {algorithm}.py")
    if state["model_shape"] != shape:
        raise ValueError(f"--resume-from {resume_from} holds a model of shape {state['model_shape']}, but --model has {shape}")
    return resume_from, state


def save_checkpoint(accelerator, output_dir: str, state: dict, keep_last: int) -> str:
    """Write update-<n> atomically on every process (each saves its own RNG state), then prune."""
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"update-{state['update']:08d}")
    tmp = os.path.join(root, f".tmp-update-{state['update']:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier write
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # the checkpoint exists only once it is complete
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def catch_stop_signals() -> dict:
    """On the first SIGINT/SIGTERM, record it and let the current update finish (the caller then
    checkpoints and exits); a second one stops at once. Returns the dict the handler writes to."""
    caught = {"signal": None}

    def handler(signum, frame):
        if caught["signal"] is not None:
            raise KeyboardInterrupt
        caught["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: finishing this update, then writing a checkpoint (again to stop now)", flush=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return caught


def all_finite(all_reduce, update: int, skip: bool, **tensors) -> bool:
    """True when every tensor is finite on every process (all_reduce sums over processes). Otherwise
    raise FloatingPointError naming the update and the quantities, before anything is updated, or
    return False when skip is set so that every process skips the batch together."""
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    device = next(iter(tensors.values())).device
    if all_reduce(torch.tensor(float(len(bad)), device=device)).item() == 0:
        return True
    if skip:
        return False
    raise FloatingPointError(
        f"update {update}: non-finite {', '.join(bad) or 'values on another process'}; stopped before updating "
        "(the last checkpoint is intact; --skip-nonfinite skips such batches instead)"
    )


def resume_command(argv: list, output_dir: str) -> str:
    """The command line that continues this run: the same arguments, --resume-from latest, --output-dir."""
    args, drop_next = [], False
    for arg in argv[1:]:
        if drop_next:
            drop_next = False
        elif arg in ("--resume-from", "--output-dir"):
            drop_next = True
        elif not arg.startswith(("--resume-from=", "--output-dir=", "--overwrite")):
            args.append(arg)
    return shlex.join(["python", argv[0], *args, "--output-dir", output_dir, "--resume-from", "latest"])
