"""The argument checks every script shares, run before anything is loaded: each error names the
flag and says what to change. A script keeps only its own algorithm's checks (K >= 2 for RLOO)."""

import importlib.util
import os

from common.lora import check_lora_args
from common.models import check_model_source
from common.vllm_engine import check_vllm_args


def check_args(args, accelerator) -> None:
    """Batch sizes (the script has filled in world_size, batch_size and num_updates), generation,
    optimisation, the reward/model/dataset combination, and the output directory."""
    if int(os.environ.get("WORLD_SIZE", 1)) != args.world_size:  # each process would train alone
        raise RuntimeError(
            f"launched as {os.environ['WORLD_SIZE']} processes but Accelerate sees {args.world_size}; "
            "on CPU (without DeepSpeed, which ACCELERATE_USE_CPU turns off) set ACCELERATE_USE_CPU=1"
        )
    positive = [
        "local_micro_batch_size",
        "gradient_accumulation_steps",
        "num_minibatches",
        "num_epochs",
        "total_episodes",
        "max_new_tokens",
        "max_prompt_length",
    ]
    for name in positive:
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.num_updates < 1:
        raise ValueError(
            f"--total-episodes {args.total_episodes} is less than one batch of {args.batch_size} responses"
        )
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature}: sampling needs a positive temperature")
    rules = {"positive": lambda v: v > 0, "at least 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}
    for name, rule in [
        ("learning_rate", "positive"),
        ("cliprange", "positive"),
        ("cliprange_value", "positive"),
        ("reward_clip", "positive"),
        ("max_grad_norm", "positive"),
        ("kl_coef", "at least 0"),
        ("gamma", "in [0, 1]"),
        ("lam", "in [0, 1]"),
    ]:
        value = getattr(args, name, None)
        if value is not None and not rules[rule](value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be {rule}")
    for name in ("warmup_updates", "save_every", "keep_last", "print_samples_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if args.reward_model is not None and args.reward_fn is not None:
        raise ValueError("give --reward-model or --reward-fn, not both")
    if args.model is not None and args.reward_model is None and args.reward_fn is None:
        raise ValueError("give a reward: --reward-model <path or hub id> or --reward-fn module:function")
    if args.model is not None and args.dataset is None:
        raise ValueError("give the prompts: --dataset <hub id, directory or file>")
    for name in ("model", "reward_model", "value_model"):  # a typo in a path fails before the output dir is made
        if getattr(args, name, None) is not None:
            check_model_source(getattr(args, name), f"--{name.replace('_', '-')}")
    check_lora_args(args)  # peft installed, target modules that --model has (read from its config)
    check_vllm_args(args, accelerator)  # vllm installed, a supported setting
    if args.resume_from not in (None, "latest") and args.output_dir is None:  # <output dir>/checkpoints/update-n
        args.output_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume_from)))
    if args.resume_from == "latest" and args.output_dir is None:
        raise ValueError(
            "--resume-from latest looks in <output dir>/checkpoints: also pass the --output-dir of the run"
        )
    if args.output_dir is not None and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise NotADirectoryError(f"--output-dir {args.output_dir} is a file; give a directory")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise ImportError(
            "--track logs to Weights & Biases, which is not installed: pip install wandb (or drop --track)"
        )
