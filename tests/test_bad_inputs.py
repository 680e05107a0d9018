"""Bad inputs to rloo.py fail early and readably: each row of the table runs main(Args(...)) and
expects an error whose message says what to fix, raised before any model is loaded (loading is
the slow part on a real model, so a typo must not cost minutes)."""

import json

import pytest
from conftest import tiny_args

import common.models
import rloo

NOT_LOADED = "model loaded"


@pytest.fixture
def model_loads(monkeypatch):
    """Every from_pretrained of a model (policy, reference, reward) is recorded and refused."""
    calls = []

    def refuse(name, *args, **kwargs):
        calls.append(name)
        raise AssertionError(NOT_LOADED)

    monkeypatch.setattr(common.models.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(common.models.AutoModelForSequenceClassification, "from_pretrained", refuse)
    return calls


class Inputs:
    """Builds the files a case needs, lazily, so each case only pays for its own fixtures."""

    def __init__(self, request, tmp_path, monkeypatch):
        self.request, self.tmp_path, self.monkeypatch = request, tmp_path, monkeypatch

    def fixture(self, name: str) -> str:
        return self.request.getfixturevalue(name)

    @property
    def llama(self) -> str:
        return self.fixture("llama_dir")

    @property
    def prompts(self) -> str:
        return self.fixture("prompts_jsonl")

    def jsonl(self, rows: list, name: str = "data.jsonl") -> str:
        path = self.tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def empty_file(self, name: str = "empty.jsonl") -> str:
        (self.tmp_path / name).write_text("")
        return str(self.tmp_path / name)

    def reward_module(self, module: str, body: str) -> str:
        """A module file `module.py` with `def reward(prompts, completions, eos, **columns)`."""
        (self.tmp_path / f"{module}.py").write_text(f"def reward(prompts, completions, eos, **columns):\n    {body}\n")
        self.monkeypatch.syspath_prepend(str(self.tmp_path))
        return f"{module}:reward"

    def two_label_reward_model(self) -> str:
        from transformers import LlamaConfig, LlamaForSequenceClassification

        from common import toy

        path = self.tmp_path / "rm-2-labels"
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, num_labels=2,
        )
        LlamaForSequenceClassification(config).save_pretrained(path)
        toy.make_tokenizer().save_pretrained(path)
        return str(path)

    def model_without_eos(self) -> str:
        """The toy model with a tokenizer that has no EOS token."""
        from transformers import PreTrainedTokenizerFast

        from common import toy

        path = self.tmp_path / "no-eos"
        toy.make_model().save_pretrained(path)
        PreTrainedTokenizerFast(tokenizer_object=toy.make_tokenizer().backend_tokenizer, pad_token="<pad>").save_pretrained(path)
        return str(path)

    def tokenizer_only(self) -> str:
        from common import toy

        path = self.tmp_path / "tokenizer-only"
        toy.make_tokenizer().save_pretrained(path)
        return str(path)


# Each case: (Args overrides built from Inputs, the error type, substrings of its message).
# model=None is the built-in toy task (policy from the toy cache, reward common.toy:sort_reward).
CASES = [
    pytest.param(lambda x: dict(num_generations=1), ValueError, ["--num-generations 1", "2 or more"], id="num_generations=1"),
    pytest.param(
        lambda x: dict(local_micro_batch_size=6, gradient_accumulation_steps=1, num_generations=4),
        ValueError, ["6 is not divisible by 4", "--num-generations"], id="batch-not-divisible-by-k",
    ),
    pytest.param(lambda x: dict(total_episodes=8), ValueError, ["--total-episodes 8", "one batch of 16"], id="total-episodes-too-small"),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"text": "abc:"}] * 8)), ValueError, ["no column 'prompt'", "['text']", "--prompt-column"],
        id="dataset-without-prompt-column",
    ),
    pytest.param(lambda x: dict(dataset=x.empty_file()), ValueError, ["empty.jsonl", "empty"], id="empty-dataset-file"),
    pytest.param(lambda x: dict(dataset=str(x.tmp_path / "nope.jsonl")), FileNotFoundError, ["nope.jsonl", "no such file"], id="dataset-file-missing"),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": "abc:"}, {"prompt": "xy:"}])), ValueError, ["2 prompts are fewer than the 4"],
        id="fewer-prompts-than-one-update",
    ),
    pytest.param(lambda x: dict(max_prompt_length=2), ValueError, ["no prompt fits", "--max-prompt-length 2"], id="no-prompt-fits"),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": 3}] * 8)), ValueError, ["must hold strings"], id="prompt-column-not-text",
    ),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": [{"role": "user", "content": "abc"}]}] * 8)), ValueError, ["no chat template"],
        id="chat-messages-without-template",
    ),
    pytest.param(
        lambda x: dict(model="./nope/model", reward_fn="common.toy:sort_reward", dataset=x.prompts),
        FileNotFoundError, ["--model", "./nope/model", "no such directory"], id="model-path-missing",
    ),
    pytest.param(
        lambda x: dict(model=x.tokenizer_only(), reward_fn="common.toy:sort_reward", dataset=x.prompts),
        OSError, ["--model", "could not be loaded"], id="model-dir-without-weights",
    ),
    pytest.param(
        lambda x: dict(model=x.model_without_eos(), reward_fn="common.toy:sort_reward", dataset=x.prompts),
        ValueError, ["no EOS token"], id="tokenizer-without-eos",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_model=x.two_label_reward_model(), dataset=x.prompts),
        ValueError, ["--reward-model", "num_labels=2"], id="reward-model-two-labels",
    ),
    pytest.param(
        lambda x: dict(reward_model=x.two_label_reward_model()), ValueError, ["--reward-model", "num_labels=2"],
        id="toy-task-reward-model-two-labels",
    ),
    pytest.param(
        lambda x: dict(reward_model="./nope/rm"), FileNotFoundError, ["--reward-model", "./nope/rm", "no such directory"],
        id="toy-task-reward-model-missing",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_model="./nope/rm", dataset=x.prompts),
        FileNotFoundError, ["--reward-model", "./nope/rm", "no such directory"], id="reward-model-missing",
    ),
    pytest.param(
        lambda x: dict(reward_fn="no_such_module_xyz:score"), ValueError, ["--reward-fn", "cannot be imported"],
        id="reward-fn-not-importable",
    ),
    pytest.param(lambda x: dict(reward_fn="common.toy"), ValueError, ["--reward-fn", "module:function"], id="reward-fn-bad-spec"),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_wrong_count", "return [0.5]")), ValueError,
        ["reward function returned 1 scores for 2 completions"], id="reward-fn-wrong-count",
    ),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_nan", "return [float('nan')] * len(completions)")), ValueError,
        ["reward function returned a non-finite score"], id="reward-fn-nan",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, dataset=x.prompts, reward_model=x.fixture("llama_reward_dir"), reward_fn="common.toy:sort_reward"),
        ValueError, ["--reward-model", "--reward-fn", "not both"], id="reward-model-and-reward-fn",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_fn="common.toy:sort_reward"), ValueError, ["--dataset"], id="model-without-dataset",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, dataset=x.prompts), ValueError, ["--reward-model", "--reward-fn"], id="model-without-reward",
    ),
    pytest.param(lambda x: dict(temperature=0.0), ValueError, ["--temperature"], id="temperature-zero"),
]


@pytest.mark.parametrize("make_overrides, error, message", CASES)
def test_bad_input_fails_before_loading_a_model(make_overrides, error, message, request, tmp_path, monkeypatch, toy_cache, model_loads):
    args = tiny_args(rloo, tmp_path, **make_overrides(Inputs(request, tmp_path, monkeypatch)))
    with pytest.raises(Exception) as info:
        rloo.main(args)
    assert not model_loads, f"a model ({model_loads[0]}) was loaded before the error; raised: {info.value!r}"
    assert isinstance(info.value, error), f"expected {error.__name__}, got {info.value!r}"
    for part in message:
        assert part in str(info.value), f"{part!r} not in the message: {info.value}"
