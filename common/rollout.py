"""Generation, truncation after the first EOS, and scoring with a reward model or a Python rule."""

import importlib
import numbers
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
import transformers

from common.data import columns_for_reward
from common.models import check_scalar_head, load_reward_tokenizer, scalar_head_values
from common.ops import first_true_indices


def generation_config(
    tokenizer, max_new_tokens: int, temperature: float, greedy: bool = False
) -> "transformers.GenerationConfig":
    """Pure sampling at a temperature (top_k=0, top_p=1: no other warper changes the distribution
    that the log-probs are recomputed under), or greedy decoding."""
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    return transformers.GenerationConfig(
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
    """The trained model as generate() needs it; elsewhere than ZeRO-3, accelerator.unwrap_model(model).
    Under DeepSpeed ZeRO-3 every module carries hooks that all-gather its weights before its forward
    and free them after, so each decoded token would gather the whole model again. Instead the full
    weights are gathered once for the rollout and the hooks are lifted until it ends (TRL does the
    same in unwrap_model_for_generation), at the cost of one full copy of the weights on every device."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield accelerator.unwrap_model(model)
        return
    import deepspeed

    hooks = model.optimizer.parameter_offload  # owner of the ZeRO-3 hooks: model is the DeepSpeedEngine
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for hook in hooks.forward_hooks + hooks.backward_hooks:
            hook.remove()
        hooks.forward_hooks, hooks.backward_hooks = [], []
        try:
            yield accelerator.unwrap_model(model)
        finally:
            hooks._register_deepspeed_module(hooks.module)


@torch.no_grad()
def generate(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    config: "transformers.GenerationConfig",
    synced: bool = False,
    engine=None,
):
    """Responses (B, T) to left-padded queries (B, P), T <= max_new_tokens. Runs in eval mode (KV
    cache on, gradient checkpointing off). `generate` builds position ids from the attention mask
    itself; its scores are discarded (recomputed later). With a vLLM engine (--vllm), the engine samples
    instead, with the same settings (common/vllm_engine.py)."""
    if engine is not None:
        return engine.generate(queries, query_mask, config)
    was_training = model.training
    model.eval()
    query_responses = model.generate(
        input_ids=queries, attention_mask=query_mask.long(), generation_config=config, synced_gpus=synced
    )
    model.train(was_training)
    return query_responses[:, queries.shape[1] :]


def truncate_at_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """Cut each response after its first EOS. Returns (responses with pad after the EOS,
    response_mask (B, T) True on real tokens including the EOS, has_eos (B,)).
    The mask comes from the position of the first EOS, never from token == pad, because many
    tokenizers (GPT-2, Pythia) use one id for both."""
    T = responses.shape[1]
    eos_index = first_true_indices(responses == eos_token_id)  # (B,), T when no EOS was emitted
    response_mask = torch.arange(T, device=responses.device) <= eos_index.unsqueeze(1)  # (B, T)
    return responses.masked_fill(~response_mask, pad_token_id), response_mask, eos_index < T


@torch.no_grad()
def score_with_model(
    reward_model, query_responses: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
):
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


@dataclass
class Reward:
    """What scores a response: a rule (fn) or a reward model, which reads the policy's token ids, or
    the decoded text re-tokenised when it has a vocabulary of its own (tokenizer)."""

    fn: Callable | None = None
    model: torch.nn.Module | None = None
    tokenizer: object = None


def check_reward(args, tokenizer, dataset) -> Reward:
    """Before any model loads: import --reward-fn and call it on two prompts (so a broken function
    fails now, not after the first generation), or check --reward-model's head and load its
    tokenizer if its vocabulary differs from the policy's. The reward model itself is loaded later,
    with the other models (Reward.model)."""
    if args.reward_fn is None:
        check_scalar_head(args.reward_model, "--reward-model", args.trust_remote_code)
        return Reward(tokenizer=load_reward_tokenizer(args.reward_model, tokenizer, args.trust_remote_code))
    reward_fn = import_reward_fn(args.reward_fn)
    probe = dataset.select(range(min(2, len(dataset))))
    no_eos = torch.zeros(len(probe), dtype=torch.bool)
    scores = score_with_fn(
        reward_fn, probe["prompt_text"], [""] * len(probe), no_eos, columns_for_reward(probe.to_dict(), 1)
    )
    if not args.skip_nonfinite and not torch.isfinite(scores).all():
        raise ValueError(f"the reward function returned a non-finite score for an empty completion: {scores.tolist()}")
    return Reward(fn=reward_fn)


def score_with_fn(reward_fn, prompts: list, completions: list, has_eos: torch.Tensor, columns: dict) -> torch.Tensor:
    """Call a rule reward as reward_fn(prompts=..., completions=..., eos=[bool], **dataset columns)
    and check that it returns one float per completion (non-finite ones are caught by the script's
    check, which stops the run or, with --skip-nonfinite, skips the batch). -> scores (B,)"""
    try:
        scores = reward_fn(prompts=prompts, completions=completions, eos=has_eos.tolist(), **columns)
    except Exception as e:
        raise RuntimeError(f"the reward function raised {type(e).__name__}: {e} (its traceback is above)") from e
    if hasattr(scores, "tolist"):  # a tensor or an array
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise TypeError(
            f"the reward function must return a list of floats, one per completion; it returned {type(scores).__name__}"
        )
    if len(scores) != len(completions):
        raise ValueError(f"the reward function returned {len(scores)} scores for {len(completions)} completions")
    bad = [s for s in scores if not isinstance(s, numbers.Real)]
    if bad:
        raise TypeError(f"the reward function returned {bad[0]!r}, which is not a number, among its scores")
    return torch.tensor(scores, dtype=torch.float32, device=has_eos.device)


def score_responses(
    reward: Reward, tokenizer, queries, query_mask, responses, response_mask, has_eos, prompts, columns
):
    """Score every (prompt, response) pair: the reward model read at the last real response token
    (the EOS when there is one), else the rule reward on the decoded text. A reward model with a
    vocabulary of its own reads the text as decoded, re-tokenised with its tokenizer, its EOS
    appended where the response ended. queries (B, P), responses (B, T) -> scores (B,) and the
    decoded completions."""
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    if reward.model is None:
        return score_with_fn(reward.fn, prompts, completions, has_eos, columns), completions
    if reward.tokenizer is not None:
        ids = reward.tokenizer([p + c for p, c in zip(prompts, completions)])["input_ids"]
        ids = [x + [reward.tokenizer.eos_token_id] if ended else x for x, ended in zip(ids, has_eos.tolist())]
        batch = reward.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(queries.device)
        last_index = torch.full_like(has_eos, batch["input_ids"].shape[1] - 1, dtype=torch.long)  # left-padded: (B,)
        scores = score_with_model(reward.model, batch["input_ids"], batch["attention_mask"].bool(), last_index)
        return scores, completions
    query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P+T)
    last_index = queries.shape[1] + response_mask.sum(dim=1) - 1  # (B,)
    return score_with_model(reward.model, query_responses, attention_mask, last_index), completions
