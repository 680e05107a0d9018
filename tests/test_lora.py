"""LoRA (common/lora.py): adapters only are trained, the reference is the policy with its adapters off
(KL exactly 0 at the start), bad flags fail before loading, an SFT adapter as --model is merged, the
saved adapter and merged model load back as the trained policy, checkpoints resume bit for bit, and
gradient checkpointing leaves the gradients unchanged.
End to end, main() of each script runs with --lora-r."""

import dataclasses
import importlib
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from conftest import read_metrics, run_cli, tiny_args

peft = pytest.importorskip("peft")

from common.lora import AdaptersOff, add_lora, check_lora_args, load_reference, model_to_save  # noqa: E402
from common.models import (  # noqa: E402
    PolicyAndValue,
    enable_gradient_checkpointing,
    load_config,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    scalar_head_values,
)
from common.ops import response_logits, selective_log_softmax  # noqa: E402

SCRIPTS = ["rloo", "remax", "ppo", "grpo"]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@dataclasses.dataclass
class LoraArgs:
    """The LoRA flags of the scripts' Args, with their defaults, and what the functions read beside them."""

    model: str | None = None
    trust_remote_code: bool = False
    lora_r: int = 4
    lora_alpha: float = 16
    lora_target_modules: str = "all-linear"
    merge_lora: bool = False


@dataclasses.dataclass
class PPOLoraArgs(LoraArgs):
    value_model: str | None = None
    reward_model: str | None = None


def _ulps(reference: torch.Tensor, n: int = 32) -> float:
    """n units in the last place of the largest entry of `reference` (fp32)."""
    return n * torch.finfo(reference.dtype).eps * reference.abs().max().item()


def _batch(vocab: int = 29, seed: int = 0):
    """Left-padded query+responses (4, 10) with T = 4 response tokens, their mask and the response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (4, 10), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    ids[0, :3] = 0
    return ids, mask, ids[:, -4:]


def _perturb_adapters(model, seed: int = 0) -> None:
    """Non-zero B (and new A), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _logits(model, ids, mask):
    with torch.no_grad():
        return response_logits(model, ids, mask, 4)


# ---- the adapters ----


def test_rank_zero_changes_nothing(llama_dir):
    model = load_policy(llama_dir)
    args = LoraArgs(lora_r=0)
    assert add_lora(model, args) is model
    check_lora_args(args)  # nothing asked, nothing checked
    with pytest.raises(ValueError, match="--merge-lora without --lora-r"):
        check_lora_args(LoraArgs(lora_r=0, merge_lora=True))
    with pytest.raises(ValueError, match="--lora-r -1"):
        check_lora_args(LoraArgs(lora_r=-1))


@pytest.mark.parametrize("model_dir", ["llama_dir", "gpt2_dir"])
def test_only_the_adapters_train_and_never_the_lm_head(request, model_dir):
    path = request.getfixturevalue(model_dir)
    policy = add_lora(load_policy(path), LoraArgs(model=path))
    assert isinstance(policy, peft.PeftModel)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted == (PROJECTIONS if model_dir == "llama_dir" else {"c_attn", "c_proj", "c_fc"})  # GPT-2: Conv1D
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())  # adapter dropout is 0


def test_listed_target_modules(llama_dir):
    policy = add_lora(load_policy(llama_dir), LoraArgs(lora_target_modules="q_proj, v_proj"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("bf16", [False, True])
def test_reference_is_the_policy_with_adapters_off(llama_dir, bf16):
    """Before training, policy and reference agree bit for bit (B = 0 adds +0.0), under bf16 autocast
    too; once B moves, the reference is still exactly the starting model, and the adapters stay
    trainable after the reference's forward."""
    torch.manual_seed(0)
    policy = add_lora(load_policy(llama_dir), LoraArgs())
    ref_policy = load_reference(LoraArgs(), policy)
    assert isinstance(ref_policy, AdaptersOff) and list(ref_policy.parameters()) == []
    ids, mask, _ = _batch()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    with autocast():
        assert torch.equal(_logits(policy, ids, mask), _logits(ref_policy, ids, mask))
    _perturb_adapters(policy)  # outside autocast, whose cache of cast weights would keep the old ones
    with autocast():
        start = _logits(load_policy(llama_dir), ids, mask)
        assert torch.equal(_logits(ref_policy, ids, mask), start)
        assert not torch.equal(_logits(policy, ids, mask), start)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_reference_generates_and_keeps_the_policys_mode(llama_dir):
    from common.rollout import generate, generation_config

    tokenizer = load_tokenizer(llama_dir)
    policy = add_lora(load_policy(llama_dir), LoraArgs())
    _perturb_adapters(policy)
    ref_policy = AdaptersOff(policy)
    enable_gradient_checkpointing(policy)  # train mode
    assert ref_policy.training and policy.training
    ref_policy.eval()
    assert not policy.training
    ref_policy.train()
    ids, mask, _ = _batch()
    config = generation_config(tokenizer, 5, 1.0, greedy=True)
    expected = generate(load_policy(llama_dir), ids[:, :6], mask[:, :6], config)
    assert torch.equal(generate(ref_policy, ids[:, :6], mask[:, :6], config), expected)
    assert policy.training  # generate() restored the mode it found


def test_value_model_keeps_its_class_and_trains_adapters_and_head(llama_dir):
    """PPO: LoRA on the value model too (the policy's backbone with a fresh head here); the head is
    trained fully, and scalar_head_values still finds the backbone and head by name."""
    args = SimpleNamespace(model=llama_dir, value_model=None, reward_model=None, trust_remote_code=False)
    from common.models import load_value_model

    value_model = add_lora(load_value_model(args), LoraArgs())
    assert type(value_model).__name__ == "LlamaForSequenceClassification"
    trainable = {n for n, p in value_model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n for n in trainable - {"score.weight"})
    policy = add_lora(load_policy(llama_dir), LoraArgs())
    model = PolicyAndValue(policy, value_model)
    ids, mask, responses = _batch()
    logits, values = model(ids, mask, 4)
    assert values.shape == (4, 4)
    assert_close(values, scalar_head_values(value_model, ids, mask)[:, -5:-1].float())
    (selective_log_softmax(logits, responses).sum() + values.sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}


# ---- bad input ----


def test_unknown_target_module_is_named_before_any_weight_is_read(llama_dir, gpt2_reward_dir, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the flags were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_loading)
    for targets, missing in [("q_proj,qkv_proj", "qkv_proj"), ("mlp", "mlp"), ("lm_head,embed_tokens", "embed_tokens")]:
        with pytest.raises(ValueError, match=f"no linear layer named {missing};") as error:
            check_lora_args(LoraArgs(model=llama_dir, lora_target_modules=targets))
        assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(error.value)
    check_lora_args(LoraArgs(model=llama_dir, lora_target_modules="q_proj,lm_head"))  # the LM head when named
    # PPO: the value model (here the GPT-2 reward model) gets the same adapters, so it must have the layers too
    args = PPOLoraArgs(model=llama_dir, reward_model=gpt2_reward_dir, lora_target_modules="q_proj")
    with pytest.raises(
        ValueError, match=r"value model \(--reward-model .*\) has no linear layer named q_proj; its linear"
    ):
        check_lora_args(args)
    with pytest.raises(ValueError, match="names no layer; give some of down_proj, gate_proj"):
        check_lora_args(LoraArgs(model=llama_dir, lora_target_modules=" , "))


def test_unknown_target_module_after_loading(llama_dir):
    """The toy task's model is only known once built: add_lora checks the loaded model the same way."""
    with pytest.raises(ValueError, match="no linear layer named qkv; its linear layers are down_proj"):
        add_lora(load_policy(llama_dir), LoraArgs(lora_target_modules="qkv"))


def test_missing_peft_says_how_to_install(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    for call in (
        lambda: check_lora_args(LoraArgs(model=llama_dir)),
        lambda: add_lora(torch.nn.Linear(2, 2), LoraArgs()),
    ):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[lora\]"'):
            call()


# ---- an SFT adapter as --model ----


@pytest.fixture
def sft_adapter(tmp_path, llama_dir):
    """A LoRA adapter of the toy policy with non-zero weights, saved without a tokenizer, whose
    adapter_config.json names the local base model."""
    torch.manual_seed(1)
    sft = peft.get_peft_model(
        load_policy(llama_dir), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    )
    _perturb_adapters(sft, seed=1)
    path = str(tmp_path / "sft-adapter")
    sft.save_pretrained(path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == llama_dir
    return path, sft


def test_sft_adapter_is_merged_and_is_the_reference(sft_adapter, llama_dir):
    path, sft = sft_adapter
    ids, mask, _ = _batch()
    expected = _logits(sft, ids, mask)
    assert load_config(path, "--model").to_dict() == load_config(llama_dir, "--model").to_dict()
    assert load_tokenizer(path).get_vocab() == load_tokenizer(llama_dir).get_vocab()
    merged = load_policy(path)
    assert not isinstance(merged, peft.PeftModel)
    assert_close(_logits(merged, ids, mask), expected, atol=_ulps(expected), rtol=0)
    assert not torch.allclose(_logits(load_policy(llama_dir), ids, mask), expected)
    # with --lora-r on top, "adapters off" is the SFT model, not its base
    policy = add_lora(load_policy(path), LoraArgs(model=path, merge_lora=True))
    _perturb_adapters(policy)
    assert torch.equal(_logits(AdaptersOff(policy), ids, mask), _logits(merged, ids, mask))
    # PPO's value model from --model: the merged backbone
    value_model = load_scalar_model(path, "--value-model", new_head=True)
    with torch.no_grad():
        hidden = value_model.model(input_ids=ids).last_hidden_state
        assert_close(hidden, merged.model(input_ids=ids).last_hidden_state, atol=0, rtol=0)


def test_sft_adapter_needs_merge_lora_and_is_refused_as_reward_model(sft_adapter):
    path, _ = sft_adapter
    with pytest.raises(ValueError, match="is a LoRA adapter.*pass --merge-lora"):
        check_lora_args(LoraArgs(model=path))
    check_lora_args(LoraArgs(model=path, merge_lora=True))
    check_lora_args(PPOLoraArgs(model=path, merge_lora=True, lora_target_modules="q_proj"))  # value model: --model's
    with pytest.raises(ValueError, match="--reward-model .* is a LoRA adapter: merge it into its base model first"):
        load_config(path, "--reward-model")


# ---- saving ----


@pytest.mark.parametrize("model_dir", ["llama_dir", "gpt2_dir"])
def test_saved_adapter_and_merged_model_load_back_as_the_trained_policy(request, tmp_path, model_dir):
    """Through the final save the scripts use (common.checkpoint.save_final with the full state dict
    of accelerator.get_state_dict): the adapter loads with peft to the same logits, and as --model of
    a later run (merged when loaded) to within rounding; the merged model loads as a plain model to
    within rounding, its weights exactly those of PEFT's merge_and_unload. GPT-2's Conv1D stores W
    transposed. (transformers' AutoModelForCausalLM also loads the adapter directory with peft >= 0.21.)"""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from common.checkpoint import save_final

    path = request.getfixturevalue(model_dir)
    tokenizer = load_tokenizer(path)
    accelerator = Accelerator()
    policy = accelerator.prepare(add_lora(load_policy(path), LoraArgs(model=path)))
    _perturb_adapters(policy)
    ids, mask, _ = _batch()
    trained = _logits(policy, ids, mask)
    for merge in (False, True):
        out = str(tmp_path / f"merge-{merge}")
        os.makedirs(out)
        args = LoraArgs(model=path, merge_lora=merge)
        model, state_dict = model_to_save(accelerator.unwrap_model(policy), accelerator.get_state_dict(policy), args)
        save_final(accelerator, out, model, state_dict, tokenizer)
        if not merge:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
            assert "config.json" not in os.listdir(out)
            reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), out)
            assert torch.equal(_logits(reloaded, ids, mask), trained)
            assert_close(_logits(load_policy(out), ids, mask), trained, atol=_ulps(trained), rtol=0)
        else:
            assert "adapter_config.json" not in os.listdir(out)
            reloaded = AutoModelForCausalLM.from_pretrained(out)
            assert not isinstance(reloaded, peft.PeftModel)
            assert_close(_logits(reloaded, ids, mask), trained, atol=_ulps(trained), rtol=0)
            expected = load_policy(path).state_dict()
            merged = accelerator.unwrap_model(policy).merge_and_unload(safe_merge=True).state_dict()
            assert set(reloaded.state_dict()) == set(expected)
            for key, value in reloaded.state_dict().items():
                assert torch.equal(value, merged[key]), key
    assert not torch.equal(trained, _logits(load_policy(path), ids, mask))


# ---- training ----


def _train_steps(model, optimizer, accelerator, steps: int, seed: int):
    for i in range(steps):
        ids, mask, responses = _batch(seed=seed + i)
        loss = -selective_log_softmax(response_logits(model, ids, mask, 4), responses).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_checkpoint_resume_is_bit_exact(tmp_path, llama_dir):
    """accelerator.save_state / load_state of a PeftModel and its optimizer: 2 + 2 steps straight
    equal 2 steps, a reload into a freshly built model (other random A), and 2 steps."""
    from accelerate import Accelerator

    def build(seed):
        torch.manual_seed(seed)
        accelerator = Accelerator()
        policy = add_lora(load_policy(llama_dir), LoraArgs())
        optimizer = torch.optim.AdamW(policy.parameters(), 1e-2, fused=True)
        return accelerator, *accelerator.prepare(policy, optimizer)

    accelerator, policy, optimizer = build(0)
    _train_steps(policy, optimizer, accelerator, 2, seed=0)
    accelerator.save_state(str(tmp_path / "ckpt"))
    _train_steps(policy, optimizer, accelerator, 2, seed=2)
    straight = policy.state_dict()

    accelerator, policy, optimizer = build(1)
    accelerator.load_state(str(tmp_path / "ckpt"))
    _train_steps(policy, optimizer, accelerator, 2, seed=2)
    for key, value in policy.state_dict().items():
        assert torch.equal(value, straight[key]), key
    assert any("lora_B" in k and straight[k].abs().sum() > 0 for k in straight)


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    """enable_gradient_checkpointing (use_reentrant=False) on a PeftModel: the frozen embeddings'
    output needs no requires_grad, and the adapters' gradients are those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = add_lora(load_policy(llama_dir), LoraArgs())
        _perturb_adapters(policy)
        if checkpointing:
            enable_gradient_checkpointing(policy)
            assert policy.base_model.model.model.gradient_checkpointing and policy.training
        ids, mask, responses = _batch()
        selective_log_softmax(response_logits(policy, ids, mask, 4), responses).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grads[1][name], grad, atol=_ulps(grad, 8), rtol=0)


# ---- end to end: each script's main() ----


def _lora_main(name, tmp_path, llama_dir, prompts_jsonl, **overrides):
    module = importlib.import_module(name)
    common = dict(model=llama_dir, dataset=prompts_jsonl, reward_fn="common.toy:sort_reward")
    return module.main(tiny_args(module, tmp_path, lora_r=4, **common, **overrides))


@pytest.mark.parametrize("name, bf16", [(n, False) for n in SCRIPTS] + [("rloo", True)])
def test_first_kl_is_exactly_zero(tmp_path, name, bf16, llama_dir, prompts_jsonl):
    """Two updates with LoRA and --eval-every 1: the reference is exactly the starting policy (KL 0
    in the first update and in the evaluation before training), the first ratio is 1, training moves
    the adapters (KL > 0 after), and the output is the adapter, loadable as the trained policy."""
    _lora_main(name, tmp_path, llama_dir, prompts_jsonl, bf16=bf16, eval_every=1, eval_max_prompts=8)
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["eval/kl"] == 0.0 and metrics[1]["objective/kl"] == 0.0
    if name != "ppo":  # PPO's later epochs move the policy
        assert_close(torch.tensor(metrics[1]["val/ratio"]), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert metrics[2]["eval/kl"] != 0.0
    out = os.listdir(tmp_path / "out")
    assert "adapter_config.json" in out and "config.json" not in out
    peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # onto the base model the adapter names


def test_merge_lora_and_resume(tmp_path, llama_dir, prompts_jsonl):
    """--merge-lora writes a plain model; a run resumed from a LoRA checkpoint ends bit for bit where
    the straight run ends."""
    from transformers import AutoModelForCausalLM

    common = dict(total_episodes=64, gradient_accumulation_steps=1, local_micro_batch_size=16, merge_lora=True)
    straight = str(tmp_path / "straight")
    _lora_main("ppo", tmp_path, llama_dir, prompts_jsonl, output_dir=straight, save_every=2, **common)
    resumed = str(tmp_path / "resumed")
    checkpoint = os.path.join(straight, "checkpoints", "update-00000002")
    _lora_main("ppo", tmp_path, llama_dir, prompts_jsonl, output_dir=resumed, resume_from=checkpoint, **common)
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (straight, resumed))
    assert a.keys() == load_policy(llama_dir).state_dict().keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli(tmp_path, toy_cache):
    run_cli("grpo.py", tmp_path, toy_cache, "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj")
    assert "adapter_config.json" in os.listdir(tmp_path / "cli")
