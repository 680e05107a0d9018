"""ReMax: REINFORCE with a greedy baseline (Li et al. 2023, arXiv 2310.10505).

Maximises E_{x~D, y~pi}[ r(x, y) - beta * KL(pi || pi_ref) ] with one sampled response y and one
greedy response y^ per prompt; the greedy score is the baseline:
    reward_t = -beta * kl_t  (+ r(x, y) - r(x, y^) at the last token)
    G_t      = sum_{t' >= t} gamma^(t'-t) reward_t'                  (reward-to-go)
    loss     = -sum_t G_t log pi(y_t) / (response tokens in the batch)   (one step per batch)

Differences from the paper's code (liziniu/ReMax), each so that G_t is the reward-to-go above:
1. Pure sampling (top_k=0, top_p=1), log-probs recomputed at --temperature (paper: top_p 0.9).
2. --reward-clip is off by default (the paper clips r(x, y) - r(x, y^) to [-5, 5]).
3. G_t sums all future KL terms; the paper's code overwrites its running KL, keeping token t's only.
4. gamma < 1 does not discount the score gap at its own token (the paper's code discounts it once).
5. The token mean is over the global batch, not per micro-batch and process: the gradient does not
   depend on how the batch is split over processes and accumulation steps.
Differences from rloo.py:
1. One sampled and one greedy response per prompt, the greedy score as the baseline.
2. The KL is a per-token reward and each token is weighted by its reward-to-go; no ratio, no
   clipping, one gradient step per batch.

    python remax.py
    accelerate launch --config_file configs/multi_gpu.yaml remax.py --model <policy> --reward-model <rm> --dataset <prompts>
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.checkpoint import all_finite, catch_stop_signals, check_output_dir, find_checkpoint, model_shape, resume_command, save_checkpoint
from common.data import columns_for_reward, load_prompt_dataset, make_collator, repeat_forever, tokenize_prompts
from common.models import check_scalar_head, load_config, load_reward_tokenizer, enable_gradient_checkpointing, load_frozen, load_policy, load_scalar_model, load_tokenizer, prepare_frozen
from common.ops import INVALID_LOGPROB, entropy_from_logits, forward, masked_sum, selective_log_softmax
from common.rollout import generate, generation_config, import_reward_fn, needs_synced_generation, score_responses, score_with_fn, truncate_after_eos, unwrap_for_generation
from common.toy import build_toy, toy_dataset
from common.tracking import close_tracking, init_tracking, log_metrics, samples_table


@dataclass
class Args:
    # Experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment, the first part of the run name"""
    seed: int = 1
    """seed of the initial weights and shuffles; sampling uses seed + 100003 * process index"""
    output_dir: str | None = None
    """where the trained policy, tokenizer and metrics.jsonl go (default: output/<run name>)"""
    track: bool = False
    """also log to Weights & Biases"""
    wandb_project: str = "onefile-rlhf"
    """the wandb project, with --track"""
    print_samples_every: int = 10
    """print a table of (prompt, completion, score) every N updates and at the end (0: only at the end)"""
    save_every: int = 0
    """write a resumable checkpoint to <output dir>/checkpoints every N updates (0: only on SIGINT/SIGTERM)"""
    keep_last: int = 2
    """checkpoints to keep; older ones are deleted"""
    resume_from: str | None = None
    """continue a run from a checkpoint directory, or 'latest' in the --output-dir of that run"""
    overwrite: bool = False
    """allow --output-dir to hold a finished run (or an unfinished one to restart)"""

    # Model
    model: str | None = None
    """policy (and reference) model: a local directory or hub id; default: the built-in toy task"""
    reward_model: str | None = None
    """reward model (AutoModelForSequenceClassification, num_labels=1); with a tokenizer of its own it reads the decoded text re-tokenised"""
    reward_fn: str | None = None
    """a rule reward 'module:function' called as f(prompts=, completions=, eos=, **columns) -> floats"""
    trust_remote_code: bool = False
    """allow model code from the hub"""
    bf16: bool = False
    """bfloat16 autocast for the policy and reference (both fp32 weights, so the first KL is exactly 0); bf16 reward model"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% more time (off while generating)"""

    # Data
    dataset: str | None = None
    """prompts: a hub id, a local directory, or a .json/.jsonl/.parquet/.csv file"""
    dataset_split: str = "train"
    """the split to train on"""
    prompt_column: str = "prompt"
    """a string column, or a column of chat messages rendered with the tokenizer's chat template"""
    max_prompt_length: int = 512
    """prompts longer than this many tokens are dropped or left-truncated (see --prompt-truncation)"""
    prompt_truncation: Literal["drop", "left"] = "drop"
    """what to do with a prompt that is too long; either way the count is printed"""

    # Generation
    max_new_tokens: int = 8
    """response length limit (8 fits the toy task; ~50-500 for real tasks)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are recomputed at the same temperature"""
    missing_eos_penalty: float | None = None
    """if set, a response that never emitted EOS gets this score instead of the reward"""

    # Optimization
    learning_rate: float = 1e-3
    """Adam learning rate (1e-3 suits the toy task; ~1e-6 for billion-parameter models)"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """decay of the learning rate over the updates"""
    warmup_updates: int = 0
    """updates of linear warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    skip_nonfinite: bool = False
    """skip a batch whose scores, KL or advantages hold NaN/inf (counted in val/skipped_batches) instead of stopping"""
    total_episodes: int = 38400
    """responses to sample in the whole run; num_updates = total_episodes // batch_size"""

    # Batch sizes
    local_micro_batch_size: int = 64
    """responses in one forward/backward on one process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_minibatches: int = 1
    """optimizer steps per rollout batch (ReMax is on-policy: must be 1)"""

    # Algorithm
    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: log pi - log pi_ref; k3: (rho - 1) - log rho with rho = pi_ref/pi (non-negative)"""
    gamma: float = 1.0
    """discount of the reward-to-go"""
    reward_clip: float | None = None
    """if set, clip r(sample) - r(greedy) to [-reward_clip, reward_clip] (the paper uses 5)"""

    # Filled in at runtime
    world_size: tyro.conf.Suppress[int] = 0
    """number of processes"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """responses per update on one process = micro x accumulation x minibatches"""
    local_mini_batch_size: tyro.conf.Suppress[int] = 0
    """responses per optimizer step on one process"""
    batch_size: tyro.conf.Suppress[int] = 0
    """responses per update over all processes"""
    num_updates: tyro.conf.Suppress[int] = 0
    """rollout-and-update iterations"""
    run_name: tyro.conf.Suppress[str] = ""
    """<exp_name>__<seed>__<unix time>"""


# ---- Algorithm ----


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate from log pi and log pi_ref (B, T) -> (B, T).
    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (rho - 1) - log rho, rho = pi_ref/pi
    (unbiased, non-negative, lower variance; Schulman 2020)."""
    log_rho = ref_logprobs - logprobs
    return -log_rho if estimator == "k1" else torch.expm1(log_rho) - log_rho


def remax_rewards(kl, scores, baseline_scores, response_mask, kl_coef: float, reward_clip: float | None):
    """Per-token rewards -beta * kl_t, plus r(sample) - r(greedy) (optionally clipped) at the last
    real token. kl, response_mask (B, T), scores (B,) -> rewards (B, T)."""
    score_diff = scores - baseline_scores
    if reward_clip is not None:
        score_diff = score_diff.clamp(-reward_clip, reward_clip)
    rewards = (-kl_coef * kl).masked_fill(~response_mask, 0.0)
    last = response_mask.sum(dim=1, keepdim=True) - 1  # (B, 1): the EOS, or the last token if none
    return rewards.scatter_add(1, last, score_diff.unsqueeze(1).to(rewards.dtype))


def reward_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = reward_t + gamma * G_{t+1}, with G = 0 past the end. (B, T) -> (B, T).
    Rewards are zero on padding, so padding gets G = 0 and never leaks into real tokens."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def policy_loss(new_logprobs, returns, response_mask, num_tokens: float):
    """REINFORCE with reward-to-go: -sum_t G_t log pi(y_t) over the masked tokens, divided by
    num_tokens (the token count the caller normalises by). Log-probs, returns (b, T)."""
    return masked_sum(-returns * new_logprobs, response_mask) / num_tokens


def main(args: Args) -> dict:
    # ---- Set-up: every check that costs nothing comes before any model is loaded ----
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision="bf16" if args.bf16 else "no",
        # epoch e's prompt order depends only on (seed, e): the same on every process, and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    args.world_size = accelerator.num_processes
    if int(os.environ.get("WORLD_SIZE", 1)) != args.world_size:  # each process would train alone
        raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but Accelerate sees {args.world_size}; on CPU set ACCELERATE_USE_CPU=1")
    args.local_mini_batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps
    args.local_batch_size = args.local_mini_batch_size * args.num_minibatches
    args.batch_size = args.local_batch_size * args.world_size
    args.num_updates = args.total_episodes // args.batch_size
    if args.num_minibatches != 1:
        raise ValueError(f"--num-minibatches {args.num_minibatches}: ReMax takes one on-policy step per batch; use 1")
    local_num_prompts = args.local_batch_size  # one sampled response per prompt (and one greedy)
    if args.num_updates < 1:
        raise ValueError(f"--total-episodes {args.total_episodes} is less than one batch of {args.batch_size} responses")
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature}: sampling needs a positive temperature")
    if args.reward_model is not None and args.reward_fn is not None:
        raise ValueError("give --reward-model or --reward-fn, not both")
    if args.model is not None and args.reward_model is None and args.reward_fn is None:
        raise ValueError("give a reward: --reward-model <path or hub id> or --reward-fn module:function")
    if args.model is not None and args.dataset is None:
        raise ValueError("give the prompts: --dataset <hub id, directory or file>")
    if args.resume_from not in (None, "latest") and args.output_dir is None:  # <output dir>/checkpoints/update-n
        args.output_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume_from)))
    if args.resume_from == "latest" and args.output_dir is None:
        raise ValueError("--resume-from latest looks in <output dir>/checkpoints: also pass the --output-dir of the run")
    args.run_name = args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("output", args.run_name)
    check_output_dir(args.output_dir, args.resume_from, args.overwrite)

    if args.model is None:  # the built-in toy task
        with accelerator.main_process_first():
            args.model = build_toy(print_fn=accelerator.print)
        if args.reward_model is None and args.reward_fn is None:
            args.reward_fn = "common.toy:sort_reward"
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    algorithm, shape = os.path.basename(__file__)[: -len(".py")], model_shape(load_config(args.model, "--model", args.trust_remote_code))
    resume_path, resume_state = None, {"update": 0, "skipped_batches": 0}
    if args.resume_from is not None:
        resume_path, resume_state = find_checkpoint(args.resume_from, args.output_dir, algorithm, shape)
        args.run_name = resume_state["run_name"]  # continue the same TensorBoard run
    raw_dataset = toy_dataset() if args.dataset is None else load_prompt_dataset(args.dataset, args.dataset_split)
    dataset = tokenize_prompts(
        raw_dataset, args.prompt_column, tokenizer, args.max_prompt_length, args.prompt_truncation, accelerator.print
    )
    if len(dataset) < local_num_prompts * args.world_size:
        raise ValueError(f"{len(dataset)} prompts are fewer than the {local_num_prompts * args.world_size} one update needs")
    reward_fn = import_reward_fn(args.reward_fn) if args.reward_fn is not None else None
    reward_tokenizer = None  # set when the reward model has a vocabulary of its own
    if reward_fn is not None:
        probe = dataset.select(range(min(2, len(dataset))))  # fail now, not after the first generation
        no_eos = torch.zeros(len(probe), dtype=torch.bool)
        score_with_fn(reward_fn, probe["prompt_text"], [""] * len(probe), no_eos, columns_for_reward(probe.to_dict(), 1))
    else:
        check_scalar_head(args.reward_model, "--reward-model", args.trust_remote_code)
        reward_tokenizer = load_reward_tokenizer(args.reward_model, tokenizer, args.trust_remote_code)

    set_seed(args.seed)  # same initial weights and data order on every process
    frozen_dtype = torch.bfloat16 if args.bf16 else torch.float32
    policy = load_policy(args.model, torch.float32, args.trust_remote_code)
    ref_policy = load_frozen(load_policy(args.model, torch.float32, args.trust_remote_code))  # same numerics as the policy
    reward_model = None
    if args.reward_model is not None:
        reward_model = load_frozen(load_scalar_model(args.reward_model, "--reward-model", frozen_dtype, args.trust_remote_code))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)  # 3.7x faster steps at 160M params on CPU
    scheduler = get_scheduler(args.lr_schedule, optimizer, args.warmup_updates, args.num_updates)
    dataloader = DataLoader(
        dataset, batch_size=local_num_prompts, shuffle=True, drop_last=True, collate_fn=make_collator(tokenizer),
        generator=torch.Generator().manual_seed(args.seed),  # starting an epoch must not draw from the sampling RNG
    )
    # prepare() shards the dataloader: each process draws its own prompts and generates both the
    # sampled and the greedy response of each, so every pair lives on one process.
    policy, optimizer, dataloader = accelerator.prepare(policy, optimizer, dataloader)
    ref_policy = prepare_frozen(ref_policy, accelerator)  # after prepare(): ZeRO-3 reads the filled-in config
    reward_model = prepare_frozen(reward_model, accelerator) if reward_model is not None else None
    set_seed(args.seed + accelerator.process_index * 100003)  # different samples on every process
    accelerator.register_for_checkpointing(scheduler)
    if resume_path is not None:  # weights, optimizer, scheduler and every process's RNG states
        accelerator.load_state(resume_path)
        accelerator.print(f"resumed from {resume_path} after update {resume_state['update']}")
    start_update, skipped_batches = resume_state["update"], resume_state["skipped_batches"]
    gen_config = generation_config(tokenizer, args.max_new_tokens, args.temperature)
    synced = needs_synced_generation(accelerator)  # sharded weights: every process steps until all are done
    greedy_config = generation_config(tokenizer, args.max_new_tokens, args.temperature, greedy=True)
    batches = repeat_forever(dataloader, skip=start_update)
    device = accelerator.device

    trackers = {}
    if accelerator.is_main_process:
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        trackers = init_tracking(args.run_name, asdict(args), metrics_path, args.track, args.wandb_project, start_update)
        accelerator.print(
            f"{args.run_name}: {args.num_updates} updates of {args.batch_size} responses "
            f"({args.world_size} process(es) x {args.local_batch_size}), logs in runs/{args.run_name}"
        )
    stop = catch_stop_signals()  # Ctrl-C / pre-emption: finish the update, checkpoint, exit
    progress = tqdm(
        range(start_update + 1, args.num_updates + 1), initial=start_update, total=args.num_updates,
        disable=None if accelerator.is_main_process else True, desc=args.exp_name,
    )
    start_time = time.time()
    for update in progress:
        batch = next(batches)

        # 1. Rollout
        queries, query_mask = batch["queries"], batch["query_mask"]  # (B, P)
        with torch.no_grad(), unwrap_for_generation(policy, accelerator) as unwrapped:
            responses = generate(unwrapped, queries, query_mask, gen_config, synced)  # (B, T)
            greedy_responses = generate(unwrapped, queries, query_mask, greedy_config, synced)  # (B, T')
        responses, response_mask, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        greedy_responses, greedy_mask, greedy_has_eos = truncate_after_eos(
            greedy_responses, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P+T)
        T = responses.shape[1]

        # 2. Score
        prompts = batch["prompt_text"]
        columns = columns_for_reward(batch, 1)
        scores, completions = score_responses(
            queries, query_mask, responses, response_mask, has_eos, prompts, columns, tokenizer, reward_model, reward_fn, reward_tokenizer
        )
        baseline_scores, _ = score_responses(
            queries, query_mask, greedy_responses, greedy_mask, greedy_has_eos, prompts, columns, tokenizer, reward_model, reward_fn, reward_tokenizer
        )
        if args.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, torch.full_like(scores, args.missing_eos_penalty))
            baseline_scores = torch.where(greedy_has_eos, baseline_scores, torch.full_like(baseline_scores, args.missing_eos_penalty))

        # 3. Log-probs
        # Recomputed with the same forward as the update (not taken from generate), so the
        # ratio of the first minibatch is exactly 1.
        logprobs, ref_logprobs, entropy = [], [], []
        with torch.no_grad():
            for i in range(0, len(queries), args.local_micro_batch_size):
                rows = slice(i, i + args.local_micro_batch_size)
                logits = forward(policy, query_responses[rows], attention_mask[rows], logits_to_keep=T + 1).logits[:, :-1]
                logprobs.append(selective_log_softmax(logits, responses[rows], args.temperature))
                entropy.append(entropy_from_logits(logits, args.temperature))
                with accelerator.autocast():  # the autocast that prepare() gave the policy: KL 0 at the start
                    ref_logits = forward(ref_policy, query_responses[rows], attention_mask[rows], logits_to_keep=T + 1).logits[:, :-1]
                ref_logprobs.append(selective_log_softmax(ref_logits, responses[rows], args.temperature))
                del logits, ref_logits
        logprobs = torch.cat(logprobs).masked_fill(~response_mask, INVALID_LOGPROB)  # (B, T)
        ref_logprobs = torch.cat(ref_logprobs).masked_fill(~response_mask, INVALID_LOGPROB)  # (B, T)
        entropy = torch.cat(entropy)  # (B, T)

        # 4. KL-shaped rewards
        kl = kl_per_token(logprobs, ref_logprobs, args.kl_estimator).masked_fill(~response_mask, 0.0)  # (B, T)
        rewards = remax_rewards(kl, scores, baseline_scores, response_mask, args.kl_coef, args.reward_clip)  # (B, T)

        # 5. Advantages
        returns = reward_to_go(rewards, args.gamma)  # (B, T): no critic, the return is the advantage

        if not all_finite(accelerator.reduce, update, args.skip_nonfinite, scores=scores, baseline_scores=baseline_scores, kl=kl, returns=returns):
            skipped_batches += 1
            continue  # every process skips this batch together

        # 6. Update
        # One step over the whole batch: each micro-batch's token sum is divided by the response
        # tokens of the batch over all processes, shared out over the accumulation steps and
        # processes that accelerator.backward and DDP divide by (never re-averaged per micro-batch).
        num_tokens = accelerator.gather(response_mask.sum().reshape(1)).sum().item() / (args.gradient_accumulation_steps * args.world_size)
        stats = {"ratio": [], "approxkl": [], "loss": []}
        for mu_start in range(0, args.local_batch_size, args.local_micro_batch_size):
            rows = slice(mu_start, mu_start + args.local_micro_batch_size)
            with accelerator.accumulate(policy):
                logits = forward(policy, query_responses[rows], attention_mask[rows], logits_to_keep=T + 1).logits[:, :-1]
                new_logprobs = selective_log_softmax(logits, responses[rows], args.temperature)
                loss = policy_loss(new_logprobs, returns[rows], response_mask[rows], num_tokens)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"update {update}: non-finite loss; stopped before applying it")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            log_ratio = (new_logprobs.detach() - logprobs[rows])[response_mask[rows]]  # on-policy: 0
            stats["ratio"].append(log_ratio.exp())
            stats["approxkl"].append(0.5 * log_ratio**2)
            stats["loss"].append(loss.detach().reshape(1))
            del logits
        lr = scheduler.get_last_lr()[0]  # the rate this update used
        scheduler.step()

        # 7. Log
        def global_mean(x: torch.Tensor) -> float:
            """Mean over all processes of tensors whose sizes may differ (token counts do)."""
            sums = accelerator.gather(torch.stack([x.double().sum(), torch.tensor(x.numel(), dtype=torch.float64, device=device)]))
            return (sums[0::2].sum() / sums[1::2].sum()).item()

        def global_var(x: torch.Tensor) -> float:
            return global_mean((x.double() - global_mean(x)) ** 2)

        ratio = torch.cat(stats["ratio"])
        metrics = {
            "objective/scores": global_mean(scores),
            "objective/baseline_scores": global_mean(baseline_scores),
            "objective/kl": global_mean(kl.sum(dim=1)),
            "objective/rlhf_reward": global_mean(scores - args.kl_coef * kl.sum(dim=1)),
            "objective/entropy": global_mean(masked_sum(entropy, response_mask, dim=1)),
            "policy/approxkl": global_mean(torch.cat(stats["approxkl"])),
            "loss/policy": global_mean(torch.cat(stats["loss"])),
            "val/ratio": global_mean(ratio),
            "val/ratio_var": global_var(ratio),
            "val/num_eos_tokens": accelerator.gather(has_eos.float()).sum().item(),
            "val/response_length": global_mean(response_mask.sum(dim=1)),
            "val/return_abs": global_mean(returns.abs()[response_mask]),
            "lr": lr,
            "episode": update * args.batch_size,
            "val/skipped_batches": skipped_batches,
            "time/episodes_per_second": (update - start_update) * args.batch_size / (time.time() - start_time),
        }
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"update {update}: non-finite metrics {metrics}")
        if accelerator.is_main_process:
            log_metrics(trackers, metrics, update)
            progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            progress.write(
                f"update {update}/{args.num_updates} | episode {metrics['episode']} | score {metrics['objective/scores']:.3f}"
                f" | kl {metrics['objective/kl']:.3f} | rlhf_reward {metrics['objective/rlhf_reward']:.3f}"
                f" | entropy {metrics['objective/entropy']:.2f} | episodes/s {metrics['time/episodes_per_second']:.0f}"
            )
            if update == args.num_updates or (args.print_samples_every and update % args.print_samples_every == 0):
                progress.write(samples_table(prompts, completions, scores.tolist()))

        stopping = accelerator.reduce(torch.tensor(float(stop["signal"] is not None), device=device)).item() > 0
        if stopping or (args.save_every and update % args.save_every == 0):
            checkpoint_state = {"algorithm": algorithm, "update": update, "run_name": args.run_name, "model_shape": shape,
                                "skipped_batches": skipped_batches}
            path = save_checkpoint(accelerator, args.output_dir, checkpoint_state, args.keep_last)
            accelerator.print(f"checkpoint: {path}")
        if stopping:
            progress.close()
            accelerator.print(f"stopped after update {update}; to continue: {resume_command(sys.argv, args.output_dir)}")
            raise SystemExit(128 + (stop["signal"] or 15))

    # Save: the full state dict is gathered on the main process, whatever the engine.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(policy)
    accelerator.unwrap_model(policy).save_pretrained(
        args.output_dir, state_dict=state_dict, save_function=accelerator.save, is_main_process=accelerator.is_main_process
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        close_tracking(trackers)
        accelerator.print(f"saved the trained policy and tokenizer to {args.output_dir}")
    accelerator.wait_for_everyone()  # leave together: gloo's teardown can hang while a peer is already gone
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(tyro.cli(Args))
