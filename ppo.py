"""PPO with a learned critic (Schulman et al. 2017, arXiv 1707.06347; RLHF as in Ouyang et al. 2022
and Huang et al. 2024, "The N+ implementation details of RLHF with PPO", arXiv 2403.17031).

Maximises E_{x~D, y~pi}[ r(x, y) - beta * KL(pi || pi_ref) ] with a value model V as the baseline:
    reward_t = -beta * kl_t  (+ r(x, y) at the last token)
    A_t      = sum_l (gamma lam)^l delta_{t+l},  delta_t = reward_t + gamma V_{t+1} - V_t   (GAE)
    G_t      = A_t + V_t,  A whitened over the batch's response tokens
    loss     = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))                  rho_t = pi/pi_old
               + vf_coef * mean_t 0.5 max((V - G)^2, (clip(V, V_old - eps_v, V_old + eps_v) - G)^2)

Differences from the papers:
1. Log-probs are recomputed under the policy after generation (never taken from `generate`), so
   the ratio is exactly 1 on the first minibatch.
   Values are recomputed with the same forward.
2. No adaptive KL controller: beta is fixed, as in the twins.
Differences from rloo.py:
1. One sample per prompt and a learned value model with GAE over tokens as the baseline.
2. A per-token clipped ratio and a clipped value loss, over --num-epochs epochs; the policy
   and value model are trained together (two trained models, four held).

    python ppo.py
    accelerate launch --config_file configs/multi_gpu.yaml ppo.py --model <id> --reward-model <id> --dataset <id>
"""

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from common.data import columns_for_reward, load_prompts, make_collator, repeat_forever
from common.lora import add_lora, load_reference
from common.models import enable_gradient_checkpointing, load_policy, load_reward_model
from common.models import load_tokenizer, prepare_frozen
from common.models import PolicyAndValue, check_scalar_head, load_value_model
from common.ops import INVALID_LOGPROB, entropy_from_logits, global_means, global_var, masked_sum
from common.ops import masked_whiten, lr_scheduler, response_logits, selective_log_softmax
from common.rollout import check_reward, generate, generation_config, needs_synced_generation, score_responses
from common.rollout import truncate_at_eos, unwrap_for_generation
from common.run import Run
from common.vllm_engine import VLLMEngine


@dataclass
class Args:
    # Model
    model: str | None = None
    """policy (and reference) model: a local directory or hub id; default: the built-in toy task"""
    reward_model: str | None = None
    """reward model (a sequence classifier, num_labels=1); one with its own vocabulary reads the text re-tokenised"""
    reward_fn: str | None = None
    """a rule reward 'module:function' called as f(prompts=, completions=, eos=, **columns) -> floats"""
    value_model: str | None = None
    """value model (num_labels=1); default: the reward model if given, else the policy with a fresh head"""
    trust_remote_code: bool = False
    """allow model code from the hub"""

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
    vllm: bool = False
    """sample the responses with vLLM in this process (pip install -e ".[vllm]"); log-probs are still recomputed"""
    vllm_gpu_memory_utilization: float = 0.3
    """with --vllm: the fraction of GPU memory (on CPU: of RAM) vLLM may fill, training's use included"""
    missing_eos_penalty: float | None = None
    """if set, a response that never emitted EOS gets this score instead of the reward"""

    # Algorithm
    kl_coef: float = 0.05
    """beta, the weight of the KL penalty"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: log pi - log pi_ref; k3: (rho - 1) - log rho with rho = pi_ref/pi (non-negative)"""
    num_epochs: int = 4
    """passes over each rollout batch; more than one makes the clipped ratio matter"""
    cliprange: float = 0.2
    """eps of the clipped ratio"""
    cliprange_value: float = 0.2
    """eps_v: how far a value prediction may move from its rollout value before its loss is clipped"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    gamma: float = 1.0
    """discount of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (without shifting their mean) before GAE"""

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
    total_episodes: int = 19200
    """responses to sample in the whole run; num_updates = total_episodes // batch_size"""
    bf16: bool = False
    """bf16 for policy and reference, the same numerics for both (the first KL is exactly 0); a bf16 reward model"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% more time (off while generating)"""
    lora_r: int = 0
    """LoRA rank: train low-rank adapters, not the weights (0: off); pi_ref is the policy with adapters off"""
    lora_alpha: float = 16
    """LoRA scale: an adapter adds (alpha / r) B A x"""
    lora_target_modules: str = "all-linear"
    """comma-separated linear layers to adapt (e.g. q_proj,v_proj); all-linear: all but the output head"""
    merge_lora: bool = False
    """save the policy with its adapters merged in (loads with AutoModelForCausalLM), not the adapter alone"""

    # Batch sizes
    local_micro_batch_size: int = 64
    """responses in one forward/backward on one process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_minibatches: int = 1
    """optimizer steps per epoch over one rollout batch"""

    # Run: output, logging, checkpoints
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
    eval_every: int = 0
    """evaluate on held-out prompts before training, every N updates and at the end (0: never, nothing held out)"""
    eval_dataset: str | None = None
    """evaluation prompts, in --dataset's formats (default: --eval-split of --dataset, else --eval-fraction of it)"""
    eval_split: str | None = None
    """the split of --eval-dataset (default: --dataset-split), or of --dataset to evaluate on instead of holding out"""
    eval_fraction: float = 0.05
    """held out of --dataset and never trained on when no --eval-dataset or --eval-split (the toy task has its own)"""
    eval_samples: int = 0
    """K responses per held-out prompt sampled at --temperature, besides the greedy one (eval/sampled_*)"""
    eval_max_prompts: int = 512
    """evaluate on at most this many prompts (0: all)"""
    save_every: int = 0
    """write a resumable checkpoint to <output dir>/checkpoints every N updates (0: only on SIGINT/SIGTERM)"""
    keep_last: int = 2
    """checkpoints to keep; older ones are deleted (0: keep all)"""
    resume_from: str | None = None
    """continue a run from a checkpoint directory, or 'latest' in the --output-dir of that run"""
    overwrite: bool = False
    """allow --output-dir to hold a finished run (or an unfinished one to restart)"""
    skip_nonfinite: bool = False
    """skip a batch whose scores, KL or advantages hold NaN/inf (counted in val/skipped_batches) instead of stopping"""

    # Filled in at runtime
    world_size: tyro.conf.Suppress[int] = 0
    """number of processes"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """responses per update on one process"""
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


def ppo_rewards(kl, scores, response_mask, kl_coef: float):
    """Per-token rewards -beta * kl_t plus the score at the last real token.
    kl, response_mask (B, T), scores (B,) -> rewards (B, T)."""
    rewards = (-kl_coef * kl).masked_fill(~response_mask, 0.0)
    last = response_mask.sum(dim=1, keepdim=True) - 1  # (B, 1): the EOS, or the last token if none
    return rewards.scatter_add(1, last, scores.unsqueeze(1).to(rewards.dtype))


def gae(rewards, values, response_mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  G_t = A_t + V_t,
    with V = 0 and A = 0 past the last real token. rewards, values (B, T) -> advantages, returns (B, T)."""
    values = values.masked_fill(~response_mask, 0.0)
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def policy_loss(new_logprobs, old_logprobs, advantages, response_mask, cliprange: float, num_tokens: float):
    """Clipped surrogate per token: sum_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)) / num_tokens,
    rho_t = exp(new - old). All (b, T). Returns the loss and, per token, the ratio and whether it was clipped."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_sum(torch.max(unclipped, clipped), response_mask) / num_tokens
    return loss, ratio.detach(), (clipped > unclipped).detach()


def value_loss(new_values, old_values, returns, response_mask, cliprange_value: float, num_tokens: float):
    """0.5 sum_t max((V - G)^2, (clip(V, V_old - eps_v, V_old + eps_v) - G)^2) / num_tokens. All (b, T).
    Returns the loss and, per token, whether the clipped term was the larger."""
    clipped_values = torch.clamp(new_values, old_values - cliprange_value, old_values + cliprange_value)  # exact inside
    unclipped_loss, clipped_loss = (new_values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.max(unclipped_loss, clipped_loss), response_mask) / num_tokens
    return loss, (clipped_loss > unclipped_loss).detach()


def main(args: Args) -> dict:
    # ---- Set-up: every check that costs nothing comes before any model is loaded ----
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "no",
        # epoch e's prompt order depends only on (seed, e): the same on every process, and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    args.world_size = accelerator.num_processes
    args.local_mini_batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps
    args.local_batch_size = args.local_mini_batch_size * args.num_minibatches
    args.batch_size = args.local_batch_size * args.world_size
    args.num_updates = args.total_episodes // max(args.batch_size, 1)  # check_args rejects sizes < 1
    local_num_prompts = args.local_batch_size  # one response per prompt
    run = Run(args, accelerator, __file__)  # checks, output dir, resume lookup; the toy task if no --model
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    dataset = load_prompts(args, tokenizer, local_num_prompts * args.world_size, accelerator.print)
    dataset = run.hold_out_eval_prompts(dataset, tokenizer)  # with --eval-every: prompts never trained on
    reward = check_reward(args, tokenizer, dataset)  # a rule, or the reward model's head and tokenizer
    if args.value_model is not None:
        check_scalar_head(args.value_model, "--value-model", args.trust_remote_code)

    set_seed(args.seed)  # same initial weights and data order on every process
    policy = add_lora(load_policy(args.model, torch.float32, args.trust_remote_code), args)  # if --lora-r
    ref_policy = load_reference(args, policy)  # fp32 copy of --model, or (--lora-r) the policy with adapters off
    reward.model = load_reward_model(args)  # None with --reward-fn
    value_model = add_lora(load_value_model(args), args)  # --value-model, else the reward model, else the policy
    model = PolicyAndValue(policy, value_model)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # fused: 3.7x faster steps at 160M parameters on CPU
    optimizer = torch.optim.AdamW(model.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = lr_scheduler(args.lr_schedule, optimizer, args.warmup_updates, args.num_updates)
    generator = torch.Generator().manual_seed(args.seed)  # starting an epoch must not draw from the sampling RNG
    collate = make_collator(tokenizer)  # left-pads the prompts
    dataloader = DataLoader(
        dataset, local_num_prompts, shuffle=True, drop_last=True, collate_fn=collate, generator=generator
    )
    # prepare() shards the dataloader: each process draws its own prompts and scores its own
    # responses; whitening and metrics are the only statistics that cross processes.
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    ref_policy = prepare_frozen(ref_policy, accelerator)  # after prepare(): ZeRO-3 reads the filled-in config
    reward.model = prepare_frozen(reward.model, accelerator) if reward.model is not None else None
    engine = VLLMEngine(args, accelerator) if args.vllm else None  # --vllm: built here, before the seeds below
    set_seed(args.seed + accelerator.process_index * 100003)  # different samples on every process
    accelerator.register_for_checkpointing(scheduler)
    start_update = run.resume()  # weights, optimizer, scheduler and every process's RNG states
    run.start_evaluation(tokenizer, reward, ref_policy)  # with --eval-every: the starting policy's held-out scores
    gen_config = generation_config(tokenizer, args.max_new_tokens, args.temperature)
    synced = needs_synced_generation(accelerator)  # sharded weights: every process steps until all are done
    batches = repeat_forever(dataloader, skip=start_update)
    device = accelerator.device

    for update in range(start_update + 1, args.num_updates + 1):
        batch = next(batches)

        # 1. Rollout
        queries, query_mask = batch["queries"], batch["query_mask"]  # (B, P)
        with torch.no_grad(), unwrap_for_generation(model, accelerator) as unwrapped:
            if engine is not None:  # --vllm: the engine samples from the policy's current weights
                engine.load_weights(unwrapped.policy)
            responses = generate(unwrapped.policy, queries, query_mask, gen_config, synced, engine)  # (B, T)
        responses, response_mask, has_eos = truncate_at_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P+T)
        T = responses.shape[1]
        run.tick("rollout", tokens=response_mask)  # time/rollout: seconds since the update began; likewise below

        # 2. Score
        prompts = batch["prompt_text"]
        columns = columns_for_reward(batch, 1)
        scores, completions = score_responses(
            reward, tokenizer, queries, query_mask, responses, response_mask, has_eos, prompts, columns
        )
        if args.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, args.missing_eos_penalty)
        run.tick("score")

        # 3. Log-probs
        # Recomputed with the same forward as the update (not taken from generate), so the
        # ratio of the first minibatch is exactly 1.
        logprobs, ref_logprobs, entropy, values = [], [], [], []
        with torch.no_grad():
            for i in range(0, len(queries), args.local_micro_batch_size):
                rows = slice(i, i + args.local_micro_batch_size)
                logits, value = model(query_responses[rows], attention_mask[rows], T)  # (b, T, V), (b, T)
                values.append(value)
                logprobs.append(selective_log_softmax(logits, responses[rows], args.temperature))
                entropy.append(entropy_from_logits(logits, args.temperature))
                with accelerator.autocast():  # the autocast that prepare() gave the policy: KL 0 at the start
                    ref_logits = response_logits(ref_policy, query_responses[rows], attention_mask[rows], T)
                ref_logprobs.append(selective_log_softmax(ref_logits, responses[rows], args.temperature))
                del logits, ref_logits
        logprobs = torch.cat(logprobs).masked_fill(~response_mask, INVALID_LOGPROB)  # (B, T)
        ref_logprobs = torch.cat(ref_logprobs).masked_fill(~response_mask, INVALID_LOGPROB)  # (B, T)
        entropy = torch.cat(entropy)  # (B, T)
        values = torch.cat(values).masked_fill(~response_mask, 0.0)  # (B, T)
        run.tick("logprobs")

        # 4. KL-shaped rewards
        kl = kl_per_token(logprobs, ref_logprobs, args.kl_estimator).masked_fill(~response_mask, 0.0)  # (B, T)
        rewards = ppo_rewards(kl, scores, response_mask, args.kl_coef)  # (B, T)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False, all_reduce=accelerator.reduce)

        # 5. Advantages
        advantages, returns = gae(rewards, values, response_mask, args.gamma, args.lam)  # (B, T)
        advantages = masked_whiten(advantages, response_mask, all_reduce=accelerator.reduce)  # over all processes
        if not run.all_finite(update, scores=scores, kl=kl, values=values, advantages=advantages):
            continue  # --skip-nonfinite: every process skips this batch together

        # 6. Update
        # --num-epochs passes over the batch, each in a new order, cut into micro-batches; accumulate()
        # steps the optimizer every gradient_accumulation_steps of them, once per minibatch.
        # Token means over each minibatch: a micro-batch's token sum is divided by the minibatch's
        # response tokens over all processes, shared out over the accumulation steps and processes
        # that accelerator.backward and DDP divide by (never re-averaged per micro-batch).
        orders = [torch.randperm(args.local_batch_size, device=device) for _ in range(args.num_epochs)]
        stats = defaultdict(list)  # per micro-batch statistics, logged in step 7
        minibatches = torch.cat(orders).split(args.local_mini_batch_size)
        minibatch_tokens = accelerator.reduce(torch.stack([response_mask[mb].sum() for mb in minibatches]))
        minibatch_tokens = minibatch_tokens / (args.gradient_accumulation_steps * args.world_size)
        for i, rows in enumerate(torch.cat(orders).split(args.local_micro_batch_size)):
            num_tokens = minibatch_tokens[i // args.gradient_accumulation_steps]  # of the minibatch of rows
            with accelerator.accumulate(model):
                logits, new_values = model(query_responses[rows], attention_mask[rows], T)
                new_logprobs = selective_log_softmax(logits, responses[rows], args.temperature)
                pg_loss, ratio, clipped = policy_loss(
                    new_logprobs, logprobs[rows], advantages[rows], response_mask[rows], args.cliprange, num_tokens
                )
                vf_loss, vf_clipped = value_loss(
                    new_values, values[rows], returns[rows], response_mask[rows], args.cliprange_value, num_tokens
                )
                loss = pg_loss + args.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"update {update}: non-finite loss; stopped before applying it")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            stats["ratio"].append(ratio[response_mask[rows]])
            stats["clipped"].append(clipped[response_mask[rows]].float())
            stats["approxkl"].append(0.5 * ratio[response_mask[rows]].log() ** 2)
            stats["loss"].append(pg_loss.detach().reshape(1))
            stats["value_loss"].append(vf_loss.detach().reshape(1))
            stats["value_clipped"].append(vf_clipped[response_mask[rows]].float())
            stats["vpred"].append(new_values.detach()[response_mask[rows]])
            del logits
        lr = scheduler.get_last_lr()[0]  # the rate this update used
        scheduler.step()
        run.tick("update", tokens=attention_mask)

        # 7. Log
        ratio = torch.cat(stats["ratio"])
        metrics = global_means(
            accelerator,
            {  # means over all processes
                "objective/scores": scores,
                "objective/kl": kl.sum(dim=1),
                "objective/rlhf_reward": scores - args.kl_coef * kl.sum(dim=1),
                "objective/entropy": masked_sum(entropy, response_mask, dim=1),
                "policy/approxkl": torch.cat(stats["approxkl"]),
                "policy/clipfrac": torch.cat(stats["clipped"]),
                "loss/policy": torch.cat(stats["loss"]),
                "loss/value": torch.cat(stats["value_loss"]),
                "val/clipfrac": torch.cat(stats["value_clipped"]),
                "val/vpred": torch.cat(stats["vpred"]),
                "val/ratio": ratio,
                "val/response_length": response_mask.sum(dim=1),
                "val/advantage_abs": advantages.abs()[response_mask],
            },
        )
        metrics["val/ratio_var"] = global_var(accelerator, ratio)
        residual_var = global_var(accelerator, (returns - values)[response_mask])
        metrics["val/explained_variance"] = 1.0 - residual_var / global_var(accelerator, returns[response_mask])
        metrics["val/num_eos_tokens"] = accelerator.gather(has_eos.float()).sum().item()
        metrics["lr"] = lr
        if engine is not None:  # vLLM's log-probs of its samples against the recomputed ones: ~0 unless stale
            metrics["val/rollout_logprob_diff"] = engine.logprob_diff(accelerator, logprobs, response_mask)
        run.log(update, metrics, samples=(prompts, completions, scores), policy=model)
        run.end_update(update)  # a checkpoint every --save-every updates; stop here after Ctrl-C / SIGTERM

    # Save: the full state dict is gathered on the main process, whatever the engine.
    state_dict = accelerator.get_state_dict(model) or {}  # the policy's weights: "policy.*" (None off the main process)
    state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
    return run.save(accelerator.unwrap_model(model).policy, state_dict, tokenizer)


if __name__ == "__main__":
    main(tyro.cli(Args))
