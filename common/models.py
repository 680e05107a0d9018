"""Loading the tokenizer and the models (policy, frozen reference, reward, value) with dropout off."""

import copy
import json
import os

import torch
import transformers  # a lazy module: its model classes load on first use, so `--help` stays fast
from transformers.utils import logging as hf_logging

from common.ops import position_ids_from_mask, response_logits

hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars: noise next to our own progress


def check_model_source(name: str, flag: str) -> None:
    """Fail early and readably when a local path does not exist (instead of a hub stack trace, or a
    minute of retries when the hub is unreachable). A name is local when it looks like a path, or
    when its first folder exists here: 'models/typo' beside a models/ folder is no hub id."""
    first = name.split("/")[0]
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        reason = ""
    elif "/" in name and os.path.isdir(first):
        reason = f" (./{first} exists, so this is a local path, not a hub id)"
    else:
        return
    if not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"{flag} {name!r}: no such directory{reason}")


def adapter_base(name: str) -> str | None:
    """The base model named in a local LoRA adapter directory's adapter_config.json (an SFT adapter
    given as --model), or None when `name` is not one."""
    path = os.path.join(os.path.expanduser(name), "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{name!r} is a LoRA adapter whose adapter_config.json names no base_model_name_or_path")
    return base


def load_config(name: str, flag: str, trust_remote_code: bool = False):
    """AutoConfig of a local directory or hub id, with an error that names the flag. A LoRA adapter as
    --model has its base model's config (the shapes of the merged model); elsewhere it is refused."""
    check_model_source(name, flag)
    base = adapter_base(name)
    if base is not None and flag != "--model":
        raise ValueError(
            f"{flag} {name!r} is a LoRA adapter: merge it into its base model first (peft's "
            "AutoPeftModelForSequenceClassification.from_pretrained(...).merge_and_unload().save_pretrained(dir))"
        )
    if base is not None:
        return load_config(base, f"{flag} {name!r} is a LoRA adapter; its base model", trust_remote_code)
    path = os.path.expanduser(name)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):  # local wins over the hub
        raise FileNotFoundError(f"{flag} {name!r} is not a model directory (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    except Exception as e:  # offline hub, typo in the id, missing config.json
        raise OSError(f"{flag} {name!r} could not be loaded: {e}") from e


def max_positions(name: str, trust_remote_code: bool = False) -> int | None:
    """The positions --model can encode (max_position_embeddings, GPT-2's n_positions), or None."""
    config = load_config(name, "--model", trust_remote_code)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding (prompts are left-padded) and a pad token (EOS if it has none).
    When it cannot be loaded, the model's config is read for an error that names --model."""
    check_model_source(name, "--model")
    path = os.path.expanduser(name)
    if adapter_base(name) is not None and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        path = os.path.expanduser(adapter_base(name))  # an adapter saved without a tokenizer: its base model's
    try:  # padding_side as a load argument: the saved tokenizer keeps it
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, padding_side="left", trust_remote_code=trust_remote_code
        )
    except Exception as e:  # an empty folder says "install sentencepiece": say what is wrong with --model
        load_config(name, "--model", trust_remote_code)
        raise OSError(f"--model {name!r}: its tokenizer could not be loaded: {e}") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name!r} has no EOS token: responses could never end; set one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks come from the first EOS, so pad == EOS is safe
    tokenizer.padding_side = "left"
    return tokenizer


def load_reward_tokenizer(name: str, policy_tokenizer, trust_remote_code: bool = False):
    """The reward model's own tokenizer when its vocabulary differs from the policy's (the reward
    model then reads re-tokenised text), else None: the policy's token ids are used as they are."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            os.path.expanduser(name), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError):  # no tokenizer files beside the reward model: it shares the policy's
        return None
    if tokenizer.get_vocab() == policy_tokenizer.get_vocab():
        return None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--reward-model {name!r}: its tokenizer differs from the policy's and has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # so the last real token is the last column
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout: nn.Dropout modules and the functional dropouts read from the config.
    With dropout on, the rollout and training passes differ and the first ratio is not 1."""
    for key, value in vars(model.config).items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_pretrained(auto_class, name: str, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """auto_class.from_pretrained(name); for a LoRA adapter directory, its base model with the adapter
    merged in (W + alpha/r B A): "--model" then means the SFT model everywhere, and the reference of
    --lora-r (the policy with its own adapters off) is that model, not the base."""
    base = adapter_base(name)
    if base is None:
        return auto_class.from_pretrained(
            os.path.expanduser(name), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    from common.lora import merge_adapter

    model = auto_class.from_pretrained(
        os.path.expanduser(base), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    return merge_adapter(model, os.path.expanduser(name))


def load_policy(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal LM with dropout off (a LoRA adapter directory: merged into its base model)."""
    load_config(name, "--model", trust_remote_code)
    model = load_pretrained(transformers.AutoModelForCausalLM, name, dtype, trust_remote_code)
    return disable_dropout(model)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass, in every transformers model inside `model` (PPO's
    wrapper holds two). Transformers only checkpoints in train mode; with dropout off, train mode
    changes nothing else (generate() switches to eval for its KV cache)."""
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel) and module.supports_gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def load_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: for the reference and the reward model."""
    model.eval().requires_grad_(False)
    return model


def prepare_frozen(model: torch.nn.Module, accelerator):
    """Place a frozen model: a full copy on every device, except under DeepSpeed, where it becomes an
    inference engine built from the training config (call after prepare(), which fills that config in):
    DeepSpeed casts weights to bf16 rather than autocasting, so the engine gives the frozen models the
    policy's numerics (first KL 0), and under ZeRO-3 shards them. Under FSDP they stay replicated."""
    if getattr(model, "shares_trained_weights", False):  # LoRA's reference: the policy, placed by prepare()
        return model
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return model.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if plugin.zero_stage != 3:
        config["zero_optimization"] = {"stage": 0}  # ZeRO-1/2 shard only training state: a full copy
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, unlike nn.Module.eval()
    return engine


def check_scalar_head(name: str, flag: str, trust_remote_code: bool = False) -> None:
    """A reward or value model must output one number per token (num_labels == 1)."""
    config = load_config(name, flag, trust_remote_code)
    if getattr(config, "num_labels", None) != 1:
        raise ValueError(
            f"{flag} {name!r} has a head with num_labels={getattr(config, 'num_labels', None)}; a reward model must "
            "output one scalar (AutoModelForSequenceClassification with num_labels=1)"
        )


def load_scalar_model(
    name: str, flag: str, trust_remote_code: bool = False, new_head: bool = False, dtype: torch.dtype = torch.float32
):
    """AutoModelForSequenceClassification with one output, dropout off: a reward or value model.
    new_head: `name` is a causal LM (or a LoRA adapter of one, merged); keep its backbone and start a
    fresh scalar head."""
    if not new_head:
        check_scalar_head(name, flag, trust_remote_code)
    model = load_pretrained(
        transformers.AutoModelForSequenceClassification, name, dtype, trust_remote_code, num_labels=1
    )
    if not isinstance(getattr(model, "score", None), torch.nn.Linear) or model.score.out_features != 1:
        raise ValueError(f"{flag} {name!r}: expected a linear `score` head with one output")
    return disable_dropout(model)


def load_reward_model(args):
    """The frozen reward model (bf16 weights under --bf16: only its score's rounding is at stake), or
    None when the reward is a rule (--reward-fn)."""
    if args.reward_model is None:
        return None
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return load_frozen(load_scalar_model(args.reward_model, "--reward-model", args.trust_remote_code, dtype=dtype))


class PolicyAndValue(torch.nn.Module):
    """PPO's two trained models as one module, so one prepare() and one optimizer cover both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int):
        """For query_responses (B, P+T) with T = response_length: the logits that predict each response
        token (B, T, V) and the value of the state each response token is sampled in (B, T), in fp32."""
        T = response_length
        logits = response_logits(self.policy, input_ids, attention_mask, T)
        return logits, scalar_head_values(self.value_model, input_ids, attention_mask)[:, -T - 1 : -1].float()


def load_value_model(args):
    """PPO's trained value model: --value-model, else the reward model, else the policy's backbone with a
    fresh scalar head. fp32 weights, like the policy."""
    from accelerate import PartialState
    from transformers.utils import logging as hf_logging

    source = args.value_model or args.reward_model
    if source:
        return load_scalar_model(source, "--value-model", args.trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "newly initialized: score.weight" report is expected here
    try:
        model = load_scalar_model(args.model, "--value-model", args.trust_remote_code, new_head=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    PartialState().print("value model: the policy's backbone with a new scalar head (random, trained from zero)")
    return model


def scalar_head_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head applied at every position (B, L) -> (B, L). We read the position ourselves:
    the model's own pooling looks for the last non-pad token, which is wrong when pad == EOS."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return model.score(hidden).squeeze(-1)
