"""The files of a run: the output-directory lock, resumable checkpoints, and the final save.

A checkpoint is Accelerate's save_state (models, optimizer, every process's RNG states, and the
registered LR scheduler) plus `state.json` (algorithm, update, run name, model and batch shapes,
and a SHA-256 of every file). It is written to a hidden temporary folder and renamed into place,
so a crash mid-write leaves the previous checkpoint as it was. The data order needs no state:
epoch e's order is a function of (seed, e).
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal

import torch

# save_state drops the tied copy of tied weights and says "Removed shared tensor ... while saving"
# at every checkpoint; loading ties them again, so for these models the message is noise.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

MODEL_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "n_embd",
    "n_layer",
)
BATCH_KEYS = ("world_size", "local_micro_batch_size", "gradient_accumulation_steps", "num_minibatches", "batch_size")
_held_locks = {}  # output dir -> open lock file of this process (a crashed main() in the same process left it)


# ---- the output directory ----


def lock_output_dir(output_dir: str, accelerator):
    """Hold an exclusive lock on <output dir>/.lock for the run's lifetime (main process), so that a
    second run in the same folder is refused with the holder's PID instead of mixing their files."""
    holder, handle = None, None
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.abspath(os.path.join(output_dir, ".lock"))
        if path in _held_locks:
            _held_locks.pop(path).close()
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            _held_locks[path] = handle
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
    refused = accelerator.reduce(torch.tensor(float(holder is not None), device=accelerator.device)).item() > 0
    if refused:
        raise RuntimeError(
            f"--output-dir {output_dir} is in use by another run (PID {holder}); "
            "wait for it or choose another directory"
        )
    return handle


def unlock_output_dir(handle) -> None:
    if handle is not None and not handle.closed:
        _held_locks.pop(os.path.abspath(handle.name), None)
        handle.close()


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list:
    """Finished checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    names = [n for n in os.listdir(root) if re.fullmatch(r"update-\d+", n)] if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names)]


def check_new_run(output_dir: str, overwrite: bool) -> None:
    """Refuse to write over a finished run (or to restart an unfinished one) unless asked. With
    --overwrite the old checkpoints and marker go, so that `latest` can never pick one of them."""
    if overwrite:
        shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)
        if os.path.exists(os.path.join(output_dir, "finished.json")):
            os.remove(os.path.join(output_dir, "finished.json"))
        return
    if os.path.exists(os.path.join(output_dir, "finished.json")):
        raise FileExistsError(
            f"--output-dir {output_dir} holds a finished run; "
            "pass --overwrite to replace it, or choose another directory"
        )
    if list_checkpoints(output_dir):
        raise FileExistsError(
            f"--output-dir {output_dir} holds checkpoints of an unfinished run; "
            "pass --resume-from latest to continue it, "
            "or --overwrite to start again"
        )


# ---- checkpoints ----


def run_shape(args) -> dict:
    """What a resumed run must share with the checkpoint: the model's shapes and the batch layout."""
    from common.models import load_config

    config = load_config(args.model, "--model", args.trust_remote_code)
    model_shape = {k: getattr(config, k) for k in MODEL_SHAPE_KEYS if getattr(config, k, None) is not None}
    return {"model_shape": model_shape, **{k: getattr(args, k, 1) for k in BATCH_KEYS}}


def find_checkpoint(args, algorithm: str) -> tuple:
    """Resolve --resume-from (a checkpoint directory, or 'latest' in <output dir>/checkpoints) and check
    that it belongs to this algorithm, model shape and batch layout. Returns (path, state)."""
    path = args.resume_from
    if path == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume-from latest: no checkpoint in {checkpoint_dir(args.output_dir)} "
                "(pass the --output-dir of the run)"
            )
        path = found[-1]
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"--resume-from {path}: not a checkpoint (no state.json)")
    try:
        with open(state_file) as f:
            state = json.load(f)
    except ValueError as e:
        raise ValueError(f"--resume-from {path}: state.json is damaged ({e}){_earlier(path, args.output_dir)}") from e
    if state["algorithm"] != algorithm:
        raise ValueError(f"--resume-from {path} is a checkpoint of {state['algorithm']}.py, not {algorithm}.py")
    now = run_shape(args)
    if state.get("model_shape") != now["model_shape"]:
        raise ValueError(
            f"--resume-from {path} holds a model of shape {state.get('model_shape')}, "
            f"but --model has {now['model_shape']}"
        )
    changed = [f"{k} {state[k]} -> {now[k]}" for k in BATCH_KEYS if k in state and state[k] != now[k]]
    if changed:
        raise ValueError(
            f"--resume-from {path} was written by a run with another batch layout ({', '.join(changed)}); resume with "
            f"the same number of processes ({state['world_size']}) and the same batch-size flags, "
            "or the data order and "
            "episode count would silently differ"
        )
    return path, state


def _earlier(path: str, output_dir: str) -> str:
    """'; use <the checkpoint before path> instead' or the note that there is none."""
    found = [p for p in list_checkpoints(output_dir) if os.path.basename(p) < os.path.basename(os.path.normpath(path))]
    return (
        f"; resume from the previous one instead: --resume-from {found[-1]}"
        if found
        else "; there is no earlier checkpoint"
    )


def _checksums(folder: str) -> dict:
    """SHA-256 of every file below folder (state.json excepted), by relative path."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel != "state.json":
                digest = hashlib.sha256()
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                sums[rel] = digest.hexdigest()
    return sums


def verify(path: str, output_dir: str) -> None:
    """Check every file of a checkpoint against the checksums in its state.json."""
    with open(os.path.join(path, "state.json")) as f:
        expected = json.load(f).get("checksums")
    if expected is None:
        return  # written before checksums existed
    found = _checksums(path)
    for rel, digest in expected.items():
        if found.get(rel) != digest:
            what = "is missing" if rel not in found else "does not match its checksum (damaged)"
            raise ValueError(f"checkpoint {path}: {rel} {what}{_earlier(path, output_dir)}")


def _no_space(error: BaseException, path: str) -> bool:
    """A full disk shows as ENOSPC, or as torch's 'unexpected pos' when a write came up short."""
    return (
        getattr(error, "errno", None) == errno.ENOSPC
        or "unexpected pos" in str(error)
        or shutil.disk_usage(path).free < (1 << 20)
    )


def save(accelerator, output_dir: str, state: dict, keep_last: int) -> str:
    """Write update-<n> atomically on every process (each saves its own RNG state), then prune.
    A failed write is removed (a full disk is named as such) and the previous checkpoints stay."""
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"update-{state['update']:08d}")
    tmp = os.path.join(root, f".tmp-update-{state['update']:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier write
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({**state, "checksums": _checksums(tmp)}, f, indent=1)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        kept = f"the last checkpoint ({kept[-1]}) is intact" if kept else "no earlier checkpoint exists"
        if _no_space(e, root):
            raise OSError(
                errno.ENOSPC,
                f"no space left on {os.path.abspath(root)}: checkpoint update {state['update']} not written; {kept}",
            ) from e
        raise RuntimeError(
            f"writing checkpoint update {state['update']} failed ({type(e).__name__}: {e}); {kept}"
        ) from e
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # the checkpoint exists only once it is complete
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---- the end of a run ----


def save_final(accelerator, output_dir: str, model, state_dict: dict, tokenizer) -> None:
    """save_pretrained into a hidden folder, then move the files into --output-dir: a failure (a full
    disk) leaves no half-written model there, and the checkpoints stay. Only the main process writes
    (state_dict is already gathered there), so no other process can race it over the folder."""
    if accelerator.is_main_process:
        tmp = os.path.join(output_dir, ".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
            tokenizer.save_pretrained(tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = list_checkpoints(output_dir)
            kept = f"resume from the last checkpoint ({kept[-1]}) once fixed" if kept else "no checkpoint exists"
            if _no_space(e, output_dir):
                where = os.path.abspath(output_dir)
                raise OSError(
                    errno.ENOSPC, f"no space left on {where}: the trained policy was not saved; {kept}"
                ) from e
            raise
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    accelerator.wait_for_everyone()


def last_logged(output_dir: str) -> dict:
    """The metrics of the last update in metrics.jsonl (a resumed run that had nothing left to train)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return {k: v for k, v in json.loads(lines[-1]).items() if k != "update"} if lines else {}


def launcher() -> tuple:
    """How this process was started, from the environment: (name, the command prefix to repeat)."""
    env = "ACCELERATE_USE_CPU=1 " if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") else ""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        return f"accelerate launch, {processes} process(es)", env + "accelerate launch <the same launch options>"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun, {processes} process(es)", env + "torchrun <the same launch options>"
    return "python", env + "python"


def resume_command(argv: list, args) -> str:
    """The sentence that tells the user how to continue: the same launcher, the same arguments,
    --output-dir and --resume-from latest."""
    kept, drop_next = [], False
    for arg in argv[1:]:
        if drop_next:
            drop_next = False
        elif arg in ("--resume-from", "--output-dir"):
            drop_next = True
        elif not arg.startswith(("--resume-from=", "--output-dir=", "--overwrite")):
            kept.append(arg)
    name, prefix = launcher()
    command = prefix + " " + shlex.join([argv[0], *kept, "--output-dir", args.output_dir, "--resume-from", "latest"])
    if name == "python":
        return f"to continue: {command}"
    return f"relaunch with the same launcher and number of processes (detected: {name}) to continue: {command}"


def die_with_parent() -> None:
    """Linux: ask for SIGTERM when the launcher that started us dies (e.g. `accelerate launch`
    killed by a scheduler), so that we checkpoint instead of running on as an orphan."""
    if os.uname().sysname != "Linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass
