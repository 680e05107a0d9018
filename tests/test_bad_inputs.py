"""Bad inputs to rloo.py fail early and readably: each row of the table runs main(Args(...)) and
expects an error whose message says what to fix, raised before any model is loaded (loading is
the slow part on a real model, so a typo must not cost minutes)."""

import importlib.util
import json
import sys

import pytest
from conftest import tiny_args

import transformers
import ppo
import remax
import rloo

NOT_LOADED = "model loaded"


@pytest.fixture
def model_loads(monkeypatch):
    """Every from_pretrained of a model (policy, reference, reward) is recorded and refused."""
    calls = []

    def refuse(name, *args, **kwargs):
        calls.append(name)
        raise AssertionError(NOT_LOADED)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
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
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            num_labels=2,
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
        PreTrainedTokenizerFast(
            tokenizer_object=toy.make_tokenizer().backend_tokenizer, pad_token="<pad>"
        ).save_pretrained(path)
        return str(path)

    def folder(self, name: str, files: dict | None = None) -> str:
        """A directory under tmp_path holding `files` ({name: text}); its path."""
        path = self.tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        for file, text in (files or {}).items():
            (path / file).write_text(text)
        return str(path)

    def typo(self) -> str:
        """'models/typo': a relative path whose first folder exists (in the working directory), the rest not."""
        self.folder("models")
        return "models/typo"

    def text_file(self, name: str) -> str:
        """A one-line text file in the working directory; its relative name."""
        (self.tmp_path / name).write_text("abc:\n")
        return name

    def saved(self, splits: dict | None = None, rows: list | None = None) -> str:
        """A Dataset (rows) or a DatasetDict ({split: rows}) written with save_to_disk; its path."""
        from datasets import Dataset, DatasetDict

        path = str(self.tmp_path / "saved")
        if splits is None:
            Dataset.from_dict({"prompt": rows}).save_to_disk(path)
        else:
            DatasetDict({k: Dataset.from_dict({"prompt": v}) for k, v in splits.items()}).save_to_disk(path)
        return path

    def without(self, module: str) -> None:
        """Make `module` look uninstalled (importlib.util.find_spec returns None)."""
        self.monkeypatch.setitem(sys.modules, module, None)

    def tokenizer_only(self) -> str:
        from common import toy

        path = self.tmp_path / "tokenizer-only"
        toy.make_tokenizer().save_pretrained(path)
        return str(path)


# Each case: (Args overrides built from Inputs, the error type, substrings of its message).
# model=None is the built-in toy task (policy from the toy cache, reward common.toy:sort_reward).
# fmt: off
CASES = [
    pytest.param(
        lambda x: dict(num_generations=1), ValueError, ["--num-generations 1", "2 or more"], id="num_generations=1",
    ),
    pytest.param(
        lambda x: dict(local_micro_batch_size=6, gradient_accumulation_steps=1, num_generations=4),
        ValueError, ["6 is not divisible by 4", "--num-generations"], id="batch-not-divisible-by-k",
    ),
    pytest.param(
        lambda x: dict(total_episodes=8), ValueError, ["--total-episodes 8", "one batch of 16"],
        id="total-episodes-too-small",
    ),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"text": "abc:"}] * 8)), ValueError,
        ["no column 'prompt'", "['text']", "--prompt-column"], id="dataset-without-prompt-column",
    ),
    pytest.param(lambda x: dict(dataset=x.empty_file()), ValueError, ["empty.jsonl", "empty"], id="empty-dataset-file"),
    pytest.param(
        lambda x: dict(dataset=str(x.tmp_path / "nope.jsonl")), FileNotFoundError, ["nope.jsonl", "no such file"],
        id="dataset-file-missing",
    ),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": "abc:"}, {"prompt": "xy:"}])), ValueError,
        ["2 prompts are fewer than the 4"], id="fewer-prompts-than-one-update",
    ),
    pytest.param(
        lambda x: dict(max_prompt_length=2), ValueError, ["no prompt fits", "--max-prompt-length 2"],
        id="no-prompt-fits",
    ),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": 3}] * 8)), ValueError, ["must hold strings"],
        id="prompt-column-not-text",
    ),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": [{"role": "user", "content": "abc"}]}] * 8)), ValueError,
        ["no chat template"], id="chat-messages-without-template",
    ),
    pytest.param(
        lambda x: dict(model="./nope/model", reward_fn="common.toy:sort_reward", dataset=x.prompts),
        FileNotFoundError, ["--model", "./nope/model", "no such directory"], id="model-path-missing",
    ),
    pytest.param(
        lambda x: dict(model=x.tokenizer_only(), reward_fn="common.toy:sort_reward", dataset=x.prompts),
        FileNotFoundError, ["--model", "is not a model directory (no config.json)"],
        id="model-dir-with-only-a-tokenizer",
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
        lambda x: dict(reward_model="./nope/rm"), FileNotFoundError,
        ["--reward-model", "./nope/rm", "no such directory"], id="toy-task-reward-model-missing",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_model="./nope/rm", dataset=x.prompts),
        FileNotFoundError, ["--reward-model", "./nope/rm", "no such directory"], id="reward-model-missing",
    ),
    pytest.param(
        lambda x: dict(reward_fn="no_such_module_xyz:score"), ValueError, ["--reward-fn", "cannot be imported"],
        id="reward-fn-not-importable",
    ),
    pytest.param(
        lambda x: dict(reward_fn="common.toy"), ValueError, ["--reward-fn", "module:function"], id="reward-fn-bad-spec",
    ),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_wrong_count", "return [0.5]")), ValueError,
        ["reward function returned 1 scores for 2 completions"], id="reward-fn-wrong-count",
    ),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_nan", "return [float('nan')] * len(completions)")), ValueError,
        ["reward function returned a non-finite score"], id="reward-fn-nan",
    ),
    pytest.param(
        lambda x: dict(
            model=x.llama, dataset=x.prompts, reward_model=x.fixture("llama_reward_dir"),
            reward_fn="common.toy:sort_reward",
        ),
        ValueError, ["--reward-model", "--reward-fn", "not both"], id="reward-model-and-reward-fn",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_fn="common.toy:sort_reward"), ValueError, ["--dataset"],
        id="model-without-dataset",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, dataset=x.prompts), ValueError, ["--reward-model", "--reward-fn"],
        id="model-without-reward",
    ),
    pytest.param(lambda x: dict(temperature=0.0), ValueError, ["--temperature"], id="temperature-zero"),
    # Batch sizes: zero ones once divided by zero in the script, before check_args saw them
    *[
        pytest.param(
            lambda x, name=name: {name: 0}, ValueError, [f"--{name.replace('_', '-')} 0", "at least 1"], id=f"{name}=0",
        )
        for name in ("local_micro_batch_size", "num_minibatches", "gradient_accumulation_steps")
    ],
    pytest.param(
        lambda x: dict(local_micro_batch_size=-8), ValueError, ["--local-micro-batch-size -8", "at least 1"],
        id="micro-batch-negative",
    ),
    pytest.param(lambda x: dict(num_epochs=0), ValueError, ["--num-epochs 0", "at least 1"], id="num-epochs=0"),
    # Models: a relative path is told from a hub id by its first folder; a folder must hold config.json
    pytest.param(
        lambda x: dict(model=x.typo(), reward_fn="common.toy:sort_reward", dataset=x.prompts),
        FileNotFoundError, ["--model 'models/typo'", "no such directory", "not a hub id"],
        id="model-relative-path-typo",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_model=x.typo(), dataset=x.prompts),
        FileNotFoundError, ["--reward-model 'models/typo'", "no such directory", "not a hub id"],
        id="reward-model-relative-path-typo",
    ),
    pytest.param(
        lambda x: dict(model=x.folder("empty"), reward_fn="common.toy:sort_reward", dataset=x.prompts),
        FileNotFoundError, ["--model", "empty'", "is not a model directory (no config.json)"], id="model-empty-dir",
    ),
    pytest.param(
        lambda x: dict(
            model=x.folder("notes", {"README.txt": "hi"}), reward_fn="common.toy:sort_reward", dataset=x.prompts,
        ),
        FileNotFoundError, ["--model", "notes'", "is not a model directory (no config.json)"],
        id="model-dir-with-a-text-file",
    ),
    pytest.param(
        lambda x: dict(model=x.llama, reward_model=x.folder("empty"), dataset=x.prompts),
        FileNotFoundError, ["--reward-model", "is not a model directory (no config.json)"], id="reward-model-empty-dir",
    ),
    # Data
    pytest.param(
        lambda x: dict(dataset=x.saved(rows=[])), ValueError, ["--dataset", "saved'", "is empty"],
        id="dataset-saved-empty",
    ),
    pytest.param(
        lambda x: dict(dataset=x.text_file("prompts.txt")), ValueError,
        ["--dataset 'prompts.txt'", "unsupported", ".json", ".jsonl", ".parquet", ".csv", "save_to_disk", "hub id"],
        id="dataset-unsupported-format",
    ),
    pytest.param(
        lambda x: dict(dataset=x.jsonl([{"prompt": "abc:"}] * 3 + [{"prompt": None}] * 2 + [{"prompt": "xyz:"}] * 8)),
        ValueError, ["--prompt-column 'prompt'", "null", "row 3"], id="dataset-null-prompts",
    ),
    pytest.param(
        lambda x: dict(dataset=x.saved(splits={"train": ["abc:"] * 8, "test": ["xy:"]}), dataset_split="validation"),
        ValueError, ["--dataset-split 'validation'", "['train', 'test']"], id="dataset-dict-without-the-split",
    ),
    pytest.param(
        lambda x: dict(dataset=x.prompts, dataset_split="test"), ValueError,
        ["--dataset-split 'test'", "only the split 'train'"], id="dataset-file-with-a-split",
    ),
    pytest.param(
        lambda x: dict(dataset=x.folder("files", {"a.jsonl": '{"prompt": "abc:"}\n' * 8}), dataset_split="test"),
        ValueError, ["--dataset-split 'test'", "train"], id="dataset-dir-of-files-without-the-split",
    ),
    pytest.param(
        lambda x: dict(max_new_tokens=60), ValueError, ["--max-new-tokens 60", "--max-prompt-length", "64 positions"],
        id="prompt-and-response-beyond-positions",
    ),
    # Run management
    pytest.param(
        lambda x: dict(output_dir=x.text_file("out.txt")), NotADirectoryError, ["--output-dir", "is a file"],
        id="output-dir-is-a-file",
    ),
    pytest.param(
        lambda x: x.without("wandb") or dict(track=True), ImportError, ["--track", "pip install wandb"],
        id="track-without-wandb",
    ),
    pytest.param(lambda x: dict(keep_last=-1), ValueError, ["--keep-last -1", "0 or more"], id="keep-last-negative"),
    # Reward functions that return something else than one float per completion, or raise
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_strings", "return ['good'] * len(completions)")), TypeError,
        ["reward function returned 'good'", "not a number"], id="reward-fn-returns-strings",
    ),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_none", "return None")), TypeError,
        ["reward function must return a list of floats", "NoneType"], id="reward-fn-returns-none",
    ),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_scalar", "return 0.5")), TypeError,
        ["reward function must return a list of floats", "float"], id="reward-fn-returns-a-scalar",
    ),
    pytest.param(
        lambda x: dict(reward_fn=x.reward_module("rw_raises", "return 1 / 0")), RuntimeError,
        ["reward function raised ZeroDivisionError"], id="reward-fn-raises",
    ),
    pytest.param(
        lambda x: dict(vllm_gpu_memory_utilization=0.5), ValueError,
        ["--vllm-gpu-memory-utilization without --vllm"], id="vllm-memory-without-vllm",
    ),
    pytest.param(
        lambda x: dict(vllm=True, vllm_gpu_memory_utilization=0.0), ValueError,
        ["--vllm-gpu-memory-utilization 0.0: must be in (0, 1]"], id="vllm-memory-zero",
    ),
]
# fmt: on


def fails_early(script, args, error, message: list, model_loads) -> BaseException:
    """script.main(args) raises `error` with every substring of `message`, before any model loads."""
    with pytest.raises(Exception) as info:
        script.main(args)
    assert not model_loads, f"a model ({model_loads[0]}) was loaded before the error; raised: {info.value!r}"
    assert isinstance(info.value, error), f"expected {error.__name__}, got {info.value!r}"
    for part in message:
        assert part in str(info.value), f"{part!r} not in the message: {info.value}"
    return info.value


@pytest.mark.parametrize("make_overrides, error, message", CASES)
def test_bad_input_fails_before_loading_a_model(
    make_overrides, error, message, request, tmp_path, monkeypatch, toy_cache, model_loads
):
    args = tiny_args(rloo, tmp_path, **make_overrides(Inputs(request, tmp_path, monkeypatch)))
    fails_early(rloo, args, error, message, model_loads)


def test_remax_negative_reward_clip(tmp_path, toy_cache, model_loads):
    fails_early(
        remax, tiny_args(remax, tmp_path, reward_clip=-1.0), ValueError, ["--reward-clip -1.0", "positive"], model_loads
    )


@pytest.mark.parametrize("name", ["gamma", "lam"])
def test_ppo_discount_above_one(name, tmp_path, toy_cache, model_loads):
    fails_early(ppo, tiny_args(ppo, tmp_path, **{name: 2.0}), ValueError, [f"--{name} 2.0", "in [0, 1]"], model_loads)


def test_reward_fn_error_is_chained(request, tmp_path, monkeypatch, toy_cache, model_loads):
    """The original exception stays attached (its traceback points into the user's function)."""
    reward_fn = Inputs(request, tmp_path, monkeypatch).reward_module("rw_raises_key", "return {}['score']")
    args = tiny_args(rloo, tmp_path, reward_fn=reward_fn)
    error = fails_early(rloo, args, RuntimeError, ["reward function raised KeyError"], model_loads)
    assert isinstance(error.__cause__, KeyError)


def test_skip_nonfinite_skips_the_batch_and_trains_on(tmp_path, monkeypatch, toy_cache):
    """With --skip-nonfinite a NaN score skips its batch (counted), and the run goes on to the end.
    Call 1 is the set-up probe on empty completions; call 3 scores update 2, all NaN."""
    (tmp_path / "rw_nan_once.py").write_text(
        "from common.toy import sort_reward\n"
        "calls = []\n\n\n"
        "def reward(prompts, completions, eos, **columns):\n"
        "    calls.append(len(completions))\n"
        "    scores = sort_reward(prompts, completions, eos)\n"
        "    return [float('nan')] * len(scores) if len(calls) == 3 else scores\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = tiny_args(rloo, tmp_path, reward_fn="rw_nan_once:reward", skip_nonfinite=True, total_episodes=48)
    metrics = rloo.main(args)
    assert sys.modules["rw_nan_once"].calls == [2, 16, 16, 16]
    assert metrics["val/skipped_batches"] == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_says_how_to_install(tmp_path, toy_cache, model_loads):
    fails_early(rloo, tiny_args(rloo, tmp_path, vllm=True), ImportError, ['pip install -e ".[vllm]"'], model_loads)
