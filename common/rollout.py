"""Generation, truncation after the first EOS, and scoring with a reward model or a Python rule."""

import importlib
import math
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType
from transformers import GenerationConfig

from common.models import scalar_head_values
from common.ops import first_true_indices


def generation_config(tokenizer, max_new_tokens: int, temperature: float, greedy: bool = False) -> GenerationConfig:
    """Pure sampling at a temperature (top_k=0, top_p=1: no other warper changes the distribution
    that the log-probs are recomputed under), or greedy decoding."""
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )


def needs_synced_generation(accelerator) -> bool:
    """Under FSDP every forward gathers sharded weights collectively, so a process whose responses
    all ended must keep stepping until every process is done. (ZeRO-3 gathers once per rollout
    instead: see unwrap_for_generation.)"""
    return accelerator.distributed_type == DistributedType.FSDP


@contextmanager
def unwrap_for_generation(model, accelerator):
    """The trained model as generate() needs it. Under DeepSpeed ZeRO-3 its full weights are
    gathered once for the whole rollout (not once per decoded token) and its partitioning hooks
    are lifted meanwhile; elsewhere it is accelerator.unwrap_model(model)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield accelerator.unwrap_model(model)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield accelerator.unwrap_model(model)


@torch.no_grad()
def generate(model, queries: torch.Tensor, query_mask: torch.Tensor, config: GenerationConfig, synced: bool = False):
    """Responses (B, T) to left-padded queries (B, P), T <= max_new_tokens. Runs in eval mode (KV
    cache on, gradient checkpointing off). `generate` builds position ids from the attention mask
    itself; its scores are discarded (recomputed later)."""
    was_training = model.training
    model.eval()
    query_responses = model.generate(
        input_ids=queries, attention_mask=query_mask.long(), generation_config=config, synced_gpus=synced
    )
    model.train(was_training)
    return query_responses[:, queries.shape[1]:]


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """Cut each response after its first EOS. Returns (responses with pad after the EOS,
    response_mask (B, T) True on real tokens including the EOS, has_eos (B,)).
    The mask comes from the position of the first EOS, never from token == pad, because many
    tokenizers (GPT-2, Pythia) use one id for both."""
    T = responses.shape[1]
    eos_index = first_true_indices(responses == eos_token_id)  # (B,), T when no EOS was emitted
    response_mask = torch.arange(T, device=responses.device) <= eos_index.unsqueeze(1)  # (B, T)
    return responses.masked_fill(~response_mask, pad_token_id), response_mask, eos_index < T


@torch.no_grad()
def score_with_model(reward_model, query_responses: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor):
    """Reward-model score at the last real token of each response (the EOS when there is one),
    never one slot after it. query_responses (B, L), last_index (B,) -> scores (B,)"""
    values = scalar_head_values(reward_model, query_responses, attention_mask)  # (B, L)
    return values.gather(1, last_index.unsqueeze(1)).squeeze(1).float()


def import_reward_fn(spec: str):
    """`module:function` -> the function; ImportError/AttributeError turned into one readable error."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"--reward-fn {spec!r}: expected 'module:function', e.g. 'my_rewards:length_reward'")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward-fn {spec!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r} is not callable")
    return fn


def score_with_fn(reward_fn, prompts: list, completions: list, has_eos: torch.Tensor, columns: dict) -> torch.Tensor:
    """Call a rule reward as reward_fn(prompts=..., completions=..., eos=[bool], **dataset columns)
    and check that it returns one finite float per completion. -> scores (B,)"""
    scores = reward_fn(prompts=prompts, completions=completions, eos=has_eos.tolist(), **columns)
    scores = [float(s) for s in scores]
    if len(scores) != len(completions):
        raise ValueError(f"the reward function returned {len(scores)} scores for {len(completions)} completions")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"the reward function returned a non-finite score for completion {bad[0]}: {completions[bad[0]]!r}")
    return torch.tensor(scores, dtype=torch.float32, device=has_eos.device)


def score_responses(queries, query_mask, responses, response_mask, has_eos, prompts, columns, tokenizer, reward_model, reward_fn, reward_tokenizer=None):
    """Score every (prompt, response) pair: the reward model read at the last real response token
    (the EOS when there is one), else the rule reward on the decoded text. A reward model with a
    vocabulary of its own (reward_tokenizer) reads the text as decoded, re-tokenised with its
    tokenizer, its EOS appended where the response ended. queries (B, P), responses (B, T) ->
    scores (B,) and the decoded completions."""
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    if reward_model is None:
        return score_with_fn(reward_fn, prompts, completions, has_eos, columns), completions
    if reward_tokenizer is not None:
        ids = reward_tokenizer([p + c for p, c in zip(prompts, completions)])["input_ids"]
        ids = [x + [reward_tokenizer.eos_token_id] if ended else x for x, ended in zip(ids, has_eos.tolist())]
        batch = reward_tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(queries.device)  # left-padded
        last_index = torch.full_like(has_eos, batch["input_ids"].shape[1] - 1, dtype=torch.long)  # (B,)
        return score_with_model(reward_model, batch["input_ids"], batch["attention_mask"].bool(), last_index), completions
    query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P+T)
    last_index = queries.shape[1] + response_mask.sum(dim=1) - 1  # (B,)
    return score_with_model(reward_model, query_responses, attention_mask, last_index), completions
