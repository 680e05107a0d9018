"""LoRA (Hu et al. 2021, arXiv 2106.09685) through PEFT: train low-rank adapters instead of the weights.

With --lora-r r every adapted linear layer computes W x + (alpha / r) B A x with W frozen, A (r, in)
random and B (out, r) zero at the start; only A and B are trained (16 bytes per adapter parameter
for weight, gradient and AdamW's two moments, 4 bytes per frozen weight). The reference is the
policy itself with its adapters switched off, so no second copy is loaded. At the start B = 0 adds
+0.0 to every output, so the policy and the reference agree bit for bit and the first KL is exactly
0 (under --bf16 too). Adapter dropout is 0, like every dropout here (it would break ratio == 1).

PPO's value model gets LoRA too (add_lora recognises its scalar `score` head): fully trained it would
cost 16 bytes per parameter, as much as the policy did without LoRA. Its `score` head stays fully
trainable (a fresh head must be learnt from zero).

peft is optional (pip install -e ".[lora]") and imported only when --lora-r > 0: `--help` stays fast.
Callers: check_lora_args before any model is loaded, add_lora on each trained model, load_reference
for pi_ref, model_to_save for the final save.
"""

import dataclasses
import warnings
from contextlib import contextmanager

import torch

from common.models import adapter_base, load_config, load_frozen, load_policy

LORA_FLAGS = ("lora_alpha", "lora_target_modules", "merge_lora")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear / Conv1D except the output (LM or score) head


def import_peft():
    """The peft module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            'LoRA (--lora-r > 0, or a LoRA adapter as --model) needs peft: pip install -e ".[lora]"'
        ) from e
    return peft


@contextmanager
def _quiet():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merge_adapter(model: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """`model` (the base model, loaded) with the LoRA adapter saved in adapter_dir merged into its weights."""
    peft = import_peft()
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    config.task_type = None  # a plain PeftModel: a causal LM's adapter also fits PPO's value model (same backbone)
    with _quiet():
        return peft.PeftModel.from_pretrained(model, adapter_dir, config=config).merge_and_unload()


def target_modules(args) -> str | list:
    """--lora-target-modules as PEFT takes it: "all-linear", or a list of module names."""
    names = [n.strip() for n in args.lora_target_modules.split(",") if n.strip()]
    return ALL_LINEAR if [n.lower() for n in names] == [ALL_LINEAR] else names


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return isinstance(module, (torch.nn.Linear, Conv1D))


def check_target_modules(model: torch.nn.Module, targets, what: str) -> None:
    """Every requested name must be a linear layer of `model` (PEFT's rule: the module's full name, or
    its last dotted parts). PEFT itself ignores a name that matches nothing when another one matches:
    a typo would silently train fewer layers. A model on the meta device will do (no weights needed)."""
    if targets == ALL_LINEAR:
        return
    linear = [name for name, module in model.named_modules() if _is_linear(module)]
    names = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if not targets:
        raise ValueError(f"--lora-target-modules names no layer; give some of {', '.join(names)}, or {ALL_LINEAR}")
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if missing:
        raise ValueError(
            f"--lora-target-modules {','.join(targets)!r}: {what} has no linear layer named {', '.join(missing)}; "
            f"its linear layers are {', '.join(names)} (or pass {ALL_LINEAR}: all of them but the output head)"
        )


def _meta_model(name: str, flag: str, scalar: bool, trust_remote_code: bool) -> torch.nn.Module:
    """The architecture of `name` on the meta device: module names and shapes, no weights read or allocated."""
    import transformers

    config = load_config(name, flag, trust_remote_code)
    auto = transformers.AutoModelForSequenceClassification if scalar else transformers.AutoModelForCausalLM
    if scalar:
        config.num_labels = 1
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def check_lora_args(args) -> None:
    """The LoRA flags, before any model is loaded: peft installed, sane values, target modules that exist
    in --model (and in PPO's value model), checked on meta-device models built from the configs."""
    if args.lora_r < 0:
        raise ValueError(f"--lora-r {args.lora_r}: must be 0 (full fine-tuning) or more")
    if not args.lora_r:
        defaults = {f.name: f.default for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
        given = [f"--{k.replace('_', '-')}" for k in LORA_FLAGS if k in defaults and getattr(args, k) != defaults[k]]
        if given:
            raise ValueError(f"{', '.join(given)} without --lora-r: they only apply to LoRA (--lora-r > 0)")
        return
    import_peft()
    if not args.lora_alpha > 0:
        raise ValueError(f"--lora-alpha {args.lora_alpha}: must be > 0 (the adapter is scaled by alpha / r)")
    if args.model is not None and adapter_base(args.model) is not None and not args.merge_lora:
        raise ValueError(
            f"--model {args.model!r} is a LoRA adapter: it is merged into its base model when loaded, and a new "
            "adapter saved alone would later be applied to that base without it; pass --merge-lora to save the merged "
            "policy"
        )
    targets = target_modules(args)
    if targets == ALL_LINEAR or args.model is None:  # the toy task's model is checked once built (add_lora)
        return
    check_target_modules(_meta_model(args.model, "--model", False, args.trust_remote_code), targets, "--model")
    if hasattr(args, "value_model"):  # PPO: the value model gets the same adapters
        flag = "--value-model" if args.value_model else "--reward-model" if args.reward_model else "--model"
        source = args.value_model or args.reward_model or args.model
        value_model = _meta_model(source, flag, True, args.trust_remote_code)
        check_target_modules(value_model, targets, f"the value model ({flag} {source})")


def add_lora(model: torch.nn.Module, args) -> torch.nn.Module:
    """The model with LoRA adapters on --lora-target-modules, only those (and a scalar head) trainable;
    the model unchanged when --lora-r is 0.
    A causal LM becomes a peft.PeftModel: generate(), save_pretrained() of the adapter alone, and
    disable_adapter() for the reference. A scalar model (reward or value, its head in `score`) keeps
    its class, with the adapters injected in place (peft.inject_adapter_in_model): PPO reads its
    backbone and head by name (common.models.scalar_head_values), which a PeftModel wrapper would hide,
    and its adapters are never switched off nor saved, so nothing of PeftModel is needed. Its head is
    trained fully, not through modules_to_save, which would keep an unused frozen copy of it."""
    if not args.lora_r:
        return model
    peft = import_peft()
    scalar = isinstance(getattr(model, "score", None), torch.nn.Linear)
    targets = target_modules(args)
    check_target_modules(model, targets, "the value model" if scalar else "--model")
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,  # like every dropout here: with it the first ratio would not be 1
        target_modules=targets,
        task_type="SEQ_CLS" if scalar else "CAUSAL_LM",
        fan_in_fan_out=any(_is_linear(m) and not isinstance(m, torch.nn.Linear) for m in model.modules()),  # Conv1D
    )
    if scalar:
        model = peft.inject_adapter_in_model(config, model)  # `all-linear` leaves `score` out
        model.score.requires_grad_(True)
        return model
    with _quiet():
        # autocast_adapter_dtype=False: adapters in the weights' dtype, as inject_adapter_in_model makes them. The
        # weights are fp32 except under DeepSpeed ZeRO-3 with --bf16 (loaded in bf16 by zero.Init), where DeepSpeed
        # needs every trained parameter in one dtype (PPO trains the policy's and the value model's adapters).
        return peft.get_peft_model(model, config, autocast_adapter_dtype=False)


class AdaptersOff(torch.nn.Module):
    """The reference under LoRA: the policy with its adapters switched off (PEFT's disable_adapter()),
    through the policy's own forward and generate. It holds the policy without registering it as a
    submodule, so it has no parameters of its own: prepare_frozen leaves it alone, and nothing can
    move, freeze or save the policy's weights through it. Its train/eval mode is the policy's (read
    and set), because generate() switches the model it is given to eval mode and back."""

    shares_trained_weights = True  # read by common.models.prepare_frozen

    def __init__(self, policy):
        super().__init__()
        self.__dict__["policy"] = policy  # the unwrapped PeftModel: also what prepare() wraps (DDP, DeepSpeed)

    @property
    def training(self) -> bool:
        return self.__dict__["policy"].training if "policy" in self.__dict__ else True

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # set by nn.Module.__init__; the mode is the policy's, set by train() below

    def train(self, mode: bool = True):
        self.policy.train(mode)
        return self

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)


def load_reference(args, policy: torch.nn.Module) -> torch.nn.Module:
    """pi_ref: a frozen second copy of --model, or with --lora-r the policy with its adapters off (call
    after add_lora; no weights are loaded). fp32 weights either way: run under the policy's autocast,
    the same numerics, so the first KL is exactly 0."""
    if args.lora_r:
        return AdaptersOff(policy)
    return load_frozen(load_policy(args.model, torch.float32, args.trust_remote_code))


def merged_state_dict(model, state_dict: dict) -> dict:
    """The state dict of the plain model that `model` (a PeftModel with one LoRA adapter) computes:
    W + (alpha / r) B A (transposed for Conv1D) for every adapted W, under the base model's names, the
    adapter's entries dropped. Read from `state_dict` (accelerator.get_state_dict: whatever engine
    gathered it), not from the module, whose weights may be shards; merged weights go to the CPU one
    at a time, so the device holds one extra matrix at most."""
    from peft.tuners.lora import LoraLayer

    adapter, prefix = model.active_adapter, "base_model.model."
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    merged, skip = {}, set()
    for name, layer in layers.items():
        a, b = state_dict[f"{name}.lora_A.{adapter}.weight"], state_dict[f"{name}.lora_B.{adapter}.weight"]
        skip.update({f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"})
        delta = (b.float() @ a.float()) * layer.scaling[adapter]  # (out, in), as in PEFT's get_delta_weight
        weight = state_dict[f"{name}.base_layer.weight"]
        delta = delta.T if layer.fan_in_fan_out else delta
        merged[f"{name}.base_layer.weight"] = (weight.float() + delta).to(weight.dtype).cpu()
    out = {}
    for key, value in state_dict.items():
        if key in skip:
            continue
        value = merged.get(key, value)
        for name in layers:  # <layer>.base_layer.<param> -> <layer>.<param>
            if key.startswith(name + ".base_layer."):
                key = name + "." + key[len(name + ".base_layer.") :]
                break
        out[key.removeprefix(prefix)] = value
    return out


def model_to_save(model: torch.nn.Module, state_dict: dict, args) -> tuple:
    """(model, state_dict) for the final model.save_pretrained(dir, state_dict=state_dict), from the
    unwrapped policy and its full state dict (accelerator.get_state_dict, on every process):
    - full fine-tuning: as given;
    - LoRA: as given too: PeftModel.save_pretrained keeps the adapter's entries of a full state dict
      (adapter_config.json + adapter_model.safetensors; loads with peft.AutoPeftModelForCausalLM onto
      the base model it names, and is accepted as --model by a later run, merged when loaded);
    - LoRA with --merge-lora: the base model and the merged weights (config.json + model.safetensors,
      loads with AutoModelForCausalLM.from_pretrained). Merged on the main process only: the others
      write nothing, so they pass an empty state dict along."""
    if not (args.lora_r and args.merge_lora):
        return model, state_dict
    from accelerate import PartialState

    base = model.get_base_model()
    return base, merged_state_dict(model, state_dict) if PartialState().is_main_process else {}
