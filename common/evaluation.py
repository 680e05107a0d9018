"""Held-out evaluation: prompts the policy is never trained on, answered greedily (and, with
--eval-samples K, K times by sampling at the training temperature), scored by the run's reward
model or rule, with the summed log-ratio to the reference (k1) as the KL of each answer.

Which prompts (load_eval_prompts): --eval-dataset (its --eval-split), else the --eval-split of
--dataset, else --eval-fraction of --dataset held out of training; the toy task has its own set
of letter strings whose letters no training prompt holds. Nothing is held out with --eval-every 0,
so a run that does not evaluate trains on exactly the prompts it did before.

Guarantees (tests/test_evaluation.py, tests/test_distributed.py):
- Evaluation does not change training: the RNG states are forked (sampled answers draw from a
  stream seeded by seed, update and process), the models are only read, and every process runs
  the same collectives; the training metrics of a run with --eval-every equal those without.
- Every process answers its share of the prompts, padded to equal counts so that collective
  generation (FSDP) and sharded forwards (ZeRO-3) stay in step; the metrics are means over all
  prompts, those of greedy answers the same on any number of processes.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from common.data import check_positions, columns_for_reward, load_prompt_dataset, make_collator, tokenize_prompts
from common.models import PolicyAndValue
from common.ops import global_means, masked_sum, response_logits, selective_log_softmax
from common.rollout import generate, generation_config, needs_synced_generation, score_responses, truncate_at_eos
from common.rollout import unwrap_for_generation

if TYPE_CHECKING:  # `datasets` is imported where it is used: a script's --help must not wait for it
    from datasets import Dataset

HOLD_OUT_SEED = 0  # the held-out rows do not depend on --seed: runs of every seed evaluate on the same prompts


def check_eval_args(args) -> None:
    """The --eval-* flags, before anything is loaded."""
    for name in ("eval_every", "eval_samples", "eval_max_prompts"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction {args.eval_fraction}: must be in (0, 1)")
    if args.eval_every and args.dataset is None and args.eval_dataset is None and args.eval_split is not None:
        raise ValueError(f"--eval-split {args.eval_split!r} names a split of --dataset or --eval-dataset; give one")


def held_out_fraction(args) -> float | None:
    """The fraction of --dataset kept out of training for evaluation, or None when no row is."""
    holds_out = args.eval_every and args.dataset is not None and args.eval_dataset is None and args.eval_split is None
    return args.eval_fraction if holds_out else None


def load_eval_prompts(args, tokenizer, dataset: Dataset, min_prompts: int, print_fn=print) -> tuple:
    """(training prompts, evaluation prompts or None), both tokenized like load_prompts' output.
    Held out of --dataset: a fixed random --eval-fraction of its rows, and every other row with the
    same prompt text, so that no evaluated prompt is ever trained on; at least min_prompts stay."""
    if not args.eval_every:
        return dataset, None
    name, split = args.eval_dataset or args.dataset, args.eval_split or args.dataset_split
    if args.eval_dataset is not None or args.eval_split is not None:
        try:
            raw = load_prompt_dataset(name, split)
        except (ValueError, OSError) as e:
            raise type(e)(f"evaluation prompts (--eval-dataset {name!r}, --eval-split {split!r}): {e}") from e
        source = f"{name} ({split})"
    elif args.dataset is None:
        from common.toy import toy_eval_dataset

        raw, source = toy_eval_dataset(), "the toy task's held-out letters"
    else:
        fraction = held_out_fraction(args)
        rows = random.Random(HOLD_OUT_SEED).sample(range(len(dataset)), max(1, round(fraction * len(dataset))))
        held_out = dataset.select(sorted(rows))
        texts = set(held_out["prompt_text"])
        dataset = dataset.select([i for i, text in enumerate(dataset["prompt_text"]) if text not in texts])
        if len(dataset) < min_prompts:
            raise ValueError(
                f"holding out --eval-fraction {fraction} of --dataset leaves {len(dataset)} training prompts, fewer "
                f"than the {min_prompts} one update needs: lower --eval-fraction or give --eval-dataset"
            )
        print_fn(f"evaluation: {len(held_out)} prompts of --dataset held out of training ({len(dataset)} left)")
        return dataset, held_out.select(range(min(len(held_out), args.eval_max_prompts or len(held_out))))
    prompts = tokenize_prompts(
        raw, args.prompt_column, tokenizer, args.max_prompt_length, args.prompt_truncation, print_fn
    )
    check_positions(args, prompts)
    prompts = prompts.select(range(min(len(prompts), args.eval_max_prompts or len(prompts))))
    print_fn(f"evaluation: {len(prompts)} prompts from {source}")
    return dataset, prompts


def shard(num_prompts: int, process_index: int, num_processes: int) -> tuple:
    """This process's prompt indices, every num_processes-th, padded by repeating one of them to the
    same count on every process; -> (indices, how many are real)."""
    rows = list(range(process_index, num_prompts, num_processes))
    per_process = -(-num_prompts // num_processes)
    return rows + [rows[-1] if rows else 0] * (per_process - len(rows)), len(rows)


@torch.no_grad()
def sequence_kl(policy, ref_policy, queries, query_mask, responses, response_mask, args, accelerator):
    """sum_t log pi(y_t|.) - log pi_ref(y_t|.) over each response's tokens (k1), both at the training
    temperature and through the same forward as training. (B, P), (B, T) -> (B,)"""
    query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P+T)
    T, kl = responses.shape[1], []
    for i in range(0, len(queries), args.local_micro_batch_size):
        rows = slice(i, i + args.local_micro_batch_size)
        with accelerator.autocast():
            logits = response_logits(policy, query_responses[rows], attention_mask[rows], T)  # (b, T, V)
            ref_logits = response_logits(ref_policy, query_responses[rows], attention_mask[rows], T)
        log_ratio = selective_log_softmax(logits, responses[rows], args.temperature) - selective_log_softmax(
            ref_logits, responses[rows], args.temperature
        )
        kl.append(masked_sum(log_ratio, response_mask[rows], dim=1))
        del logits, ref_logits
    return torch.cat(kl)


def answer(policy, ref_policy, reward, tokenizer, prompts: Dataset, rows: list, config, synced, args, accelerator):
    """Generate, truncate, score and KL for the prompts at `rows` (repeats allowed), in chunks of
    --local-batch-size. -> dict of (len(rows),) tensors and the prompt texts and completions."""
    collate, device, out = make_collator(tokenizer), accelerator.device, {}
    for i in range(0, len(rows), args.local_batch_size):
        batch = collate([prompts[r] for r in rows[i : i + args.local_batch_size]])
        queries, query_mask = batch["queries"].to(device), batch["query_mask"].to(device)  # (b, P)
        with accelerator.autocast():
            responses = generate(policy, queries, query_mask, config, synced)  # (b, T)
        responses, response_mask, has_eos = truncate_at_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        scores, completions = score_responses(
            reward, tokenizer, queries, query_mask, responses, response_mask, has_eos, batch["prompt_text"],
            columns_for_reward(batch, 1),
        )  # fmt: skip
        if args.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, args.missing_eos_penalty)
        kl = sequence_kl(policy, ref_policy, queries, query_mask, responses, response_mask, args, accelerator)
        chunk = {
            "scores": scores,
            "kl": kl,
            "response_length": response_mask.sum(dim=1).float(),
            "eos": has_eos.float(),
        }
        chunk.update(prompts=batch["prompt_text"], completions=completions)
        for key, value in chunk.items():
            out.setdefault(key, []).append(value)
    return {k: torch.cat(v) if isinstance(v[0], torch.Tensor) else sum(v, []) for k, v in out.items()}


@contextmanager
def _readable_policy(model, ref_policy, accelerator):
    """The policy to generate with and whether generation must be synced. The trained model as
    prepare() returned it, unwrapped like the rollout does (PPO's policy-and-value pair as its
    policy); or ref_policy, not prepare()d: as a ZeRO-3 inference engine it gathers its weights at
    every forward, so every process must step until all are done."""
    synced = needs_synced_generation(accelerator)
    if model is ref_policy:
        plugin = accelerator.state.deepspeed_plugin
        yield accelerator.unwrap_model(model), synced or (plugin is not None and plugin.zero_stage == 3)
        return
    with unwrap_for_generation(model, accelerator) as unwrapped:
        yield (unwrapped.policy if isinstance(unwrapped, PolicyAndValue) else unwrapped), synced


def evaluate(args, accelerator, prompts: Dataset, tokenizer, reward, ref_policy, model, update: int) -> tuple:
    """Greedy answers (and --eval-samples sampled ones) of model: the trained model, or before
    training ref_policy, a frozen copy of the starting policy. -> (metrics over all processes,
    (prompts, completions, scores) of this process's greedy answers, for a table)."""
    device = accelerator.device
    rows, valid = shard(len(prompts), accelerator.process_index, accelerator.num_processes)
    configs = {"": (rows, valid, generation_config(tokenizer, args.max_new_tokens, args.temperature, greedy=True))}
    if args.eval_samples:
        K = args.eval_samples  # rows n*K..n*K+K-1 answer prompt n
        sampling = generation_config(tokenizer, args.max_new_tokens, args.temperature)
        configs["sampled_"] = ([r for r in rows for _ in range(K)], valid * K, sampling)
    metrics, results = {}, {}
    # The training rollouts' RNG streams continue after this as if it had not run.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(args.seed * 1_000_003 + update * 100_003 + accelerator.process_index)
        with _readable_policy(model, ref_policy, accelerator) as (policy, synced):
            for prefix, (prefix_rows, n, config) in configs.items():
                results[prefix] = answer(
                    policy, ref_policy, reward, tokenizer, prompts, prefix_rows, config, synced, args, accelerator
                )
                metrics.update(_metrics(accelerator, results[prefix], n, prefix))
    greedy = results[""]
    return metrics, (greedy["prompts"][:valid], greedy["completions"][:valid], greedy["scores"][:valid])


def _metrics(accelerator, results: dict, valid: int, prefix: str) -> dict:
    """Means over the real (not padding) answers of every process, and the count of answers with EOS."""
    means = global_means(accelerator, {k: results[k][:valid] for k in ("scores", "kl", "response_length")})
    num_eos = accelerator.reduce(results["eos"][:valid].sum(), reduction="sum").item()
    return {
        f"eval/{prefix}scores": means["scores"],
        f"eval/{prefix}kl": means["kl"],
        f"eval/{prefix}response_length": means["response_length"],
        f"eval/{prefix}num_eos_tokens": num_eos,
    }
