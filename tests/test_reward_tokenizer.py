"""A reward model with a vocabulary of its own reads the decoded text, re-tokenised with its tokenizer."""

import math
import string

import pytest
import torch
from torch.testing import assert_close

from common import toy
from common.models import load_reward_tokenizer, load_scalar_model, load_tokenizer
from common.rollout import Reward, score_responses, truncate_at_eos
from conftest import tiny_args


@pytest.fixture(scope="session")
def foreign_reward_dir(tmp_path_factory):
    """A Llama reward model whose character tokenizer numbers the letters backwards (z=3 ... a=28)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, ":": 2, **{c: 3 + i for i, c in enumerate(reversed(string.ascii_lowercase))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    path = str(tmp_path_factory.mktemp("foreign-rm"))
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>").save_pretrained(path)
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        num_labels=1,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def test_shared_vocabulary_needs_no_reward_tokenizer(llama_dir, llama_reward_dir):
    assert load_reward_tokenizer(llama_reward_dir, load_tokenizer(llama_dir)) is None


def test_foreign_vocabulary_is_retokenised(llama_dir, foreign_reward_dir):
    policy_tokenizer = load_tokenizer(llama_dir)
    reward_tokenizer = load_reward_tokenizer(foreign_reward_dir, policy_tokenizer)
    assert reward_tokenizer is not None and reward_tokenizer.padding_side == "left"
    reward_model = load_scalar_model(foreign_reward_dir, "--reward-model").eval()
    prompts = ["cab:", "qzbmx:"]
    queries = policy_tokenizer(prompts, padding=True, return_tensors="pt")
    responses = policy_tokenizer(["abc", "bmq"], return_tensors="pt")["input_ids"]
    responses = torch.cat(
        [responses, torch.tensor([[toy.make_tokenizer().eos_token_id], [0]])], dim=1
    )  # 1st ends with EOS
    responses, mask, has_eos = truncate_at_eos(responses, policy_tokenizer.eos_token_id, policy_tokenizer.pad_token_id)
    reward = Reward(model=reward_model, tokenizer=reward_tokenizer)
    query_ids, query_mask = queries["input_ids"], queries["attention_mask"].bool()
    scores, completions = score_responses(
        reward, policy_tokenizer, query_ids, query_mask, responses, mask, has_eos, prompts, {}
    )
    assert completions == ["abc", "bmq"]
    with torch.no_grad():  # each text alone, in the reward model's own ids, scored by the model at its last token
        for i, text in enumerate(["cab:abc", "qzbmx:bmq"]):
            ids = reward_tokenizer(text)["input_ids"] + ([reward_tokenizer.eos_token_id] if has_eos[i] else [])
            alone = reward_model(input_ids=torch.tensor([ids])).logits[0, 0]
            assert_close(scores[i], alone)
    # read with the policy's ids instead, the same model scores something else
    wrong, _ = score_responses(
        Reward(model=reward_model), policy_tokenizer, query_ids, query_mask, responses, mask, has_eos, prompts, {}
    )
    assert not torch.allclose(wrong, scores)


def test_main_with_a_foreign_reward_model(tmp_path, llama_dir, foreign_reward_dir, prompts_jsonl):
    import rloo

    metrics = rloo.main(
        tiny_args(rloo, tmp_path, model=llama_dir, reward_model=foreign_reward_dir, dataset=prompts_jsonl)
    )
    assert all(math.isfinite(v) for v in metrics.values())
