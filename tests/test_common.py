"""common/ against independent references: cross-entropy and torch.distributions for the log-prob
helpers, the distribution `generate` sampled from, naive Python loops for truncation and the
masked statistics, and the Hugging Face model's own forward on an unpadded sequence for scoring.
Every test can fail: where the reference alone might agree by accident, a control shows that a
plausible wrong version of the code is caught."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from common import toy
from common.data import load_prompt_dataset, make_collator, render_prompts, tokenize_prompts
from common.models import disable_dropout, load_policy, load_scalar_model, load_tokenizer, scalar_head_values
from common.ops import (
    entropy_from_logits,
    exact_div,
    first_true_indices,
    forward,
    masked_mean,
    masked_sum,
    masked_whiten,
    position_ids_from_mask,
    selective_log_softmax,
)
from common.rollout import generation_config, import_reward_fn, score_with_fn, score_with_model, truncate_at_eos

TEMPERATURES = [0.5, 0.7, 1.0, 1.7]


def random_logits(B=3, T=5, V=50, seed=0):
    """Logits (B, T, V) spread wide enough that the temperature matters, and labels (B, T)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * 4, torch.randint(0, V, (B, T), generator=g)


def cross_entropy_logprobs(logits, labels, temperature):
    """The reference: -cross_entropy over the flattened (B*T, V) logits, in fp32. (B, T)"""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * T, V) / temperature, labels.reshape(B * T), reduction="none")
    return -ce.view(B, T)


# ---- ops: log-probs and entropy ----


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_selective_log_softmax_equals_cross_entropy(temperature):
    logits, labels = random_logits()
    assert_close(
        selective_log_softmax(logits, labels, temperature), cross_entropy_logprobs(logits, labels, temperature)
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_selective_log_softmax_gradient_equals_cross_entropy(temperature):
    """The update backpropagates through it: the gradient must be cross-entropy's too."""
    logits, labels = random_logits()
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (selective_log_softmax(ours, labels, temperature) * weights).sum().backward()
    (cross_entropy_logprobs(ref, labels, temperature) * weights).sum().backward()
    assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_selective_log_softmax_bf16_logits_computed_in_fp32(temperature):
    """bf16 logits (what a bf16 model returns): the result is fp32, equal to the fp32 reference on
    the same (rounded) logits, and within bf16 rounding of the reference on the unrounded ones."""
    logits, labels = random_logits()
    out = selective_log_softmax(logits.bfloat16(), labels, temperature)
    assert out.dtype == torch.float32
    assert_close(out, cross_entropy_logprobs(logits.bfloat16(), labels, temperature))
    assert_close(out, cross_entropy_logprobs(logits, labels, temperature), atol=0.15, rtol=0.02)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_entropy_from_logits_equals_categorical(temperature):
    logits, _ = random_logits()
    expected = torch.distributions.Categorical(logits=logits / temperature).entropy()
    assert_close(entropy_from_logits(logits, temperature), expected)
    assert_close(entropy_from_logits(logits.bfloat16(), temperature), expected, atol=0.05, rtol=0.02)


def test_entropy_from_logits_with_masked_tokens():
    """Tokens masked with -inf (as logits processors and some models do) have p = 0 and add 0, not NaN;
    compared with a float64 sum over the unmasked tokens only."""
    logits, _ = random_logits()
    logits[..., ::3] = -torch.inf
    logits[0, 0, :-1] = -torch.inf  # one position with a single possible token: entropy 0
    kept = logits.double()
    log_p = torch.log_softmax(kept, dim=-1)
    expected = -torch.where(torch.isinf(kept), 0.0, log_p.exp() * log_p).sum(-1)
    out = entropy_from_logits(logits)
    assert torch.isfinite(out).all() and out[0, 0] == 0
    assert_close(out, expected.float())


# ---- ops: masks, positions, masked statistics ----


def test_first_true_indices_equals_naive_loop():
    bools = torch.rand(20, 7, generator=torch.Generator().manual_seed(0)) < 0.2
    bools[0] = False  # a row with no True: index T
    bools[1] = True
    expected = [next((t for t in range(7) if row[t]), 7) for row in bools.tolist()]
    assert first_true_indices(bools).tolist() == expected


def test_position_ids_from_mask_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]]).bool()
    position_ids = position_ids_from_mask(mask)
    for row, ids in zip(mask.tolist(), position_ids.tolist()):
        real = [p for keep, p in zip(row, ids) if keep]
        assert real == list(range(len(real)))
    # padded slots hold valid embedding indices (GPT-2 looks them up in its position table)
    assert position_ids.min() >= 0 and position_ids.max() < mask.shape[1]


def masked_example():
    """values (4, 6) with inf and nan on padding, and the mask (True = keep); row 3 is all padding."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g) * 3 + 1
    mask = torch.rand(4, 6, generator=g) < 0.6
    mask[0, :2] = True
    mask[0, 2:] = False
    mask[3] = False
    values[~mask] = torch.tensor([float("inf"), float("nan"), -float("inf")]).repeat(int((~mask).sum()))[
        : int((~mask).sum())
    ]
    return values, mask


def test_masked_sum_and_mean_ignore_padding_even_inf_and_nan():
    values, mask = masked_example()
    rows = [[v for v, keep in zip(vr, mr) if keep] for vr, mr in zip(values.tolist(), mask.tolist())]
    every = [v for row in rows for v in row]
    assert_close(masked_sum(values, mask), torch.tensor(sum(every)))
    assert_close(masked_mean(values, mask), torch.tensor(sum(every) / len(every)))
    assert_close(masked_sum(values, mask, dim=1), torch.tensor([sum(r) for r in rows]))
    # a row with no valid element has mean 0, not nan
    assert_close(masked_mean(values, mask, dim=1), torch.tensor([sum(r) / max(len(r), 1) for r in rows]))


def test_masked_whiten_equals_naive_and_padding_does_not_leak():
    values, mask = masked_example()
    valid = values[mask]
    whitened = masked_whiten(values, mask)
    assert_close(whitened[mask], (valid - valid.mean()) / valid.std(unbiased=True), atol=1e-5, rtol=1e-5)
    assert_close(whitened[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(whitened[mask].std(unbiased=True), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert torch.isfinite(whitened).all()
    assert_close(whitened[~mask], torch.zeros(int((~mask).sum())))


def test_masked_whiten_without_shifting_keeps_the_mean():
    values, mask = masked_example()
    valid = values[mask]
    whitened = masked_whiten(values, mask, shift_mean=False)
    assert_close(whitened[mask], (valid - valid.mean()) / valid.std() + valid.mean(), atol=1e-5, rtol=1e-5)
    assert_close(whitened[mask].mean(), valid.mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_one_valid_element_is_not_divided_by_zero(shift_mean):
    values = torch.tensor([[3.0, float("nan"), 7.0], [1.0, 2.0, 5.0]])
    mask = torch.tensor([[False, False, True], [False, False, False]])
    whitened = masked_whiten(values, mask, shift_mean=shift_mean)
    assert torch.isfinite(whitened).all()
    # one element: centred to 0 (or kept at its value), not (0 / sqrt(1e-8)) noise or inf
    assert_close(whitened, torch.tensor([[0.0, 0.0, 0.0 if shift_mean else 7.0], [0.0, 0.0, 0.0]]))


def test_masked_whiten_two_equal_elements_stay_finite():
    whitened = masked_whiten(torch.tensor([2.0, 2.0, 9.0]), torch.tensor([True, True, False]))
    assert_close(whitened, torch.zeros(3))


def test_exact_div():
    assert exact_div(12, 4, "batch vs k") == 3
    with pytest.raises(ValueError, match=r"local_batch_size vs --rloo-k: 10 is not divisible by 4"):
        exact_div(10, 4, "local_batch_size vs --rloo-k")
    with pytest.raises(ValueError, match="micro-batches"):
        exact_div(4, 0, "micro-batches")  # not a ZeroDivisionError


# ---- rollout: truncation after the first EOS ----

EOS, PAD = 2, 0


@pytest.mark.parametrize(
    "row, kept, mask, has_eos",
    [
        ([5, 6, 7, 8], [5, 6, 7, 8], [1, 1, 1, 1], False),  # no EOS: everything kept
        ([EOS, 5, EOS, 6], [EOS, PAD, PAD, PAD], [1, 0, 0, 0], True),  # EOS first: only the EOS
        ([5, EOS, 6, 7], [5, EOS, PAD, PAD], [1, 1, 0, 0], True),  # EOS in the middle
        ([5, 6, 7, EOS], [5, 6, 7, EOS], [1, 1, 1, 1], True),  # EOS last
    ],
    ids=["no-eos", "eos-first", "eos-middle", "eos-last"],
)
def test_truncate_at_eos_cases(row, kept, mask, has_eos):
    responses, response_mask, eos = truncate_at_eos(torch.tensor([row]), EOS, PAD)
    assert responses.tolist() == [kept]
    assert response_mask.tolist() == [[bool(m) for m in mask]]
    assert eos.tolist() == [has_eos]


def test_truncate_at_eos_pad_equals_eos():
    """GPT-2/Pythia: pad id == EOS id == 1. The first 1 is a real token (the EOS) and is kept;
    the 1s after it are padding. A mask built from token != pad would drop the EOS itself."""
    responses = torch.tensor([[5, 1, 6, 1, 7], [5, 6, 1, 1, 1], [1, 1, 1, 1, 1], [5, 6, 7, 8, 9]])
    out, mask, has_eos = truncate_at_eos(responses, eos_token_id=1, pad_token_id=1)
    assert out.tolist() == [[5, 1, 1, 1, 1], [5, 6, 1, 1, 1], [1, 1, 1, 1, 1], [5, 6, 7, 8, 9]]
    assert mask.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, True, False]


@pytest.mark.parametrize("eos, pad", [(2, 0), (1, 1)])
def test_truncate_at_eos_equals_naive_loop(eos, pad):
    responses = torch.randint(0, 6, (64, 9), generator=torch.Generator().manual_seed(eos))
    out, mask, has_eos = truncate_at_eos(responses, eos, pad)
    for row, out_row, mask_row, ended in zip(responses.tolist(), out.tolist(), mask.tolist(), has_eos.tolist()):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert out_row == row[:cut] + [pad] * (len(row) - cut)
        assert mask_row == [True] * cut + [False] * (len(row) - cut)
        assert ended == (eos in row)


# ---- ops.forward: recomputed log-probs are the ones generation sampled from ----


def load_policy_and_tokenizer(path):
    return load_tokenizer(path), load_policy(path).eval()


def recompute_logprobs(model, queries, query_mask, responses, response_mask, temperature):
    """What the scripts do in step 3. (B, T)"""
    T = responses.shape[1]
    with torch.no_grad():
        logits = forward(
            model, torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1), logits_to_keep=T + 1
        ).logits[:, :-1]
    return selective_log_softmax(logits, responses, temperature)


@pytest.mark.parametrize("model_dir", ["llama_dir", "gpt2_dir"])
def test_recomputed_logprobs_equal_sampling_distribution(request, model_dir):
    """Sample with the scripts' generation config on left-padded prompts, keep the scores that
    generate used (after the temperature warper), and compare with the recomputed log-probs."""
    tokenizer, model = load_policy_and_tokenizer(request.getfixturevalue(model_dir))
    temperature = 0.7
    config = copy.deepcopy(generation_config(tokenizer, max_new_tokens=8, temperature=temperature))
    config.update(output_scores=True, return_dict_in_generate=True)
    batch = tokenizer(["abcdef:", "xy:", "qzbm:", "ab:", "mnopqr:", "kji:"], padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left" and (batch.attention_mask[:, 0] == 0).any()
    queries, query_mask = batch.input_ids, batch.attention_mask.bool()  # (B, P)
    torch.manual_seed(0)
    out = model.generate(input_ids=queries, attention_mask=query_mask.long(), generation_config=config)
    responses, response_mask, _ = truncate_at_eos(
        out.sequences[:, queries.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    sampled = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (B, T, V)
    sampled = sampled.gather(-1, responses.unsqueeze(-1)).squeeze(-1)  # (B, T)
    assert response_mask.sum() >= 10  # enough tokens for the comparison to mean something

    recomputed = recompute_logprobs(model, queries, query_mask, responses, response_mask, temperature)
    assert_close(recomputed[response_mask], sampled[response_mask], atol=1e-5, rtol=0)
    # control: the wrong temperature is caught
    wrong = recompute_logprobs(model, queries, query_mask, responses, response_mask, 1.0)
    with pytest.raises(AssertionError):
        assert_close(wrong[response_mask], sampled[response_mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_dir", ["llama_dir", "gpt2_dir"])
def test_left_padding_does_not_change_logprobs(request, model_dir):
    """A prompt alone (no padding at all) vs batched with a longer prompt and a longer response
    (left padding before it, right padding after it): the same log-probs. GPT-2 has absolute
    position embeddings, so this also checks the position ids built from the mask."""
    tokenizer, model = load_policy_and_tokenizer(request.getfixturevalue(model_dir))
    eos, temperature = tokenizer.eos_token_id, 0.7
    prompts = ["ab:", "qzbmxy:"]
    answers = [tokenizer("ba")["input_ids"] + [eos], tokenizer("bmqxyz")["input_ids"] + [eos]]
    batch = make_collator(tokenizer)([{"input_ids": tokenizer(p)["input_ids"]} for p in prompts])
    T = max(map(len, answers))
    responses = torch.tensor([a + [tokenizer.pad_token_id] * (T - len(a)) for a in answers])  # (2, T)
    response_mask = torch.tensor([[t < len(a) for t in range(T)] for a in answers])  # (2, T)
    batched = recompute_logprobs(model, batch["queries"], batch["query_mask"], responses, response_mask, temperature)

    alone_query = torch.tensor([tokenizer(prompts[0])["input_ids"]])
    alone = recompute_logprobs(
        model,
        alone_query,
        torch.ones_like(alone_query, dtype=torch.bool),
        torch.tensor([answers[0]]),
        torch.ones(1, len(answers[0]), dtype=torch.bool),
        temperature,
    )
    assert batch["query_mask"][0, 0].item() is False  # the short prompt really is left-padded
    assert_close(batched[0, : len(answers[0])], alone[0], atol=1e-5, rtol=0)


def test_forward_without_position_ids_would_shift_gpt2(gpt2_dir):
    """Control for the test above: GPT-2's own default positions do shift under left padding."""
    tokenizer, model = load_policy_and_tokenizer(gpt2_dir)
    ids = torch.tensor([[1, 1, 1, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]]).bool()
    with torch.no_grad():
        alone = model(input_ids=ids[:, 3:]).logits[0, -1]
        assert_close(forward(model, ids, mask).logits[0, -1], alone, atol=1e-5, rtol=0)
        with pytest.raises(AssertionError):
            assert_close(model(input_ids=ids, attention_mask=mask.long()).logits[0, -1], alone, atol=1e-5, rtol=0)


# ---- models: scalar heads read at the right token ----


def scoring_batch(tokenizer):
    """Left-padded prompts and right-padded responses: one ends in EOS early (lots of right
    padding), one ends in EOS last, one never emits EOS. Returns the tensors and, per row, the
    unpadded token list."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = ["ab:", "qzbmxy:", "kji:"]
    raw = [
        tokenizer("ba")["input_ids"] + [eos, 9, 9, eos],
        tokenizer("bmqxy")["input_ids"] + [eos],
        tokenizer("ijklmn")["input_ids"],
    ]
    batch = make_collator(tokenizer)([{"input_ids": tokenizer(p)["input_ids"]} for p in prompts])
    responses, response_mask, _ = truncate_at_eos(torch.tensor(raw), eos, pad)
    unpadded = [
        tokenizer(p)["input_ids"] + r[: int(m.sum())] for p, r, m in zip(prompts, responses.tolist(), response_mask)
    ]
    return batch["queries"], batch["query_mask"], responses, response_mask, unpadded


@pytest.mark.parametrize("reward_dir", ["gpt2_reward_dir", "llama_reward_dir"])
def test_score_with_model_reads_the_last_real_token(request, reward_dir):
    """The score equals the model's own output on the sequence alone (no padding on either side,
    and no pad token id in the config, so HF pools at the last position): the right token even
    when the last real token is an EOS whose id is the pad id (GPT-2 reward model)."""
    path = request.getfixturevalue(reward_dir)
    tokenizer = load_tokenizer(path)
    model = load_scalar_model(path, "--reward-model").eval()
    queries, query_mask, responses, response_mask, unpadded = scoring_batch(tokenizer)
    P = queries.shape[1]
    query_responses = torch.cat([queries, responses], 1)  # (B, P+T)
    attention_mask = torch.cat([query_mask, response_mask], 1)  # (B, P+T)
    last_index = P + response_mask.sum(1) - 1  # (B,)
    scores = score_with_model(model, query_responses, attention_mask, last_index)

    reference_model = AutoModelForSequenceClassification.from_pretrained(path, pad_token_id=None).eval()
    with torch.no_grad():
        expected = torch.stack([reference_model(input_ids=torch.tensor([ids])).logits[0, 0] for ids in unpadded])
    assert_close(scores, expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        values = scalar_head_values(model, query_responses, attention_mask)  # (B, L)
    # one slot before the EOS is what "last token != pad" pooling reads when pad == EOS: wrong
    with pytest.raises(AssertionError):
        assert_close(values.gather(1, (last_index - 1).unsqueeze(1)).squeeze(1), expected, atol=1e-5, rtol=1e-5)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        # one slot after reads a pad token. (With pad == EOS that slot holds the same token id at
        # the same position id seeing the same keys as the EOS, so its value is the EOS's: no
        # way to tell them apart, and no harm.)
        rows = last_index + 1 < query_responses.shape[1]
        after = values[rows].gather(1, (last_index[rows] + 1).unsqueeze(1)).squeeze(1)
        for got, want in zip(after, expected[rows]):
            with pytest.raises(AssertionError):
                assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hf_pooling_is_wrong_when_pad_equals_eos(gpt2_reward_dir):
    """Why scalar_head_values reads the position itself: GPT-2's own pooling takes the last token
    that is not pad, i.e. the token before the EOS."""
    tokenizer = load_tokenizer(gpt2_reward_dir)
    model = load_scalar_model(gpt2_reward_dir, "--reward-model").eval()
    queries, query_mask, responses, response_mask, unpadded = scoring_batch(tokenizer)
    query_responses = torch.cat([queries, responses], 1)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    last_index = queries.shape[1] + response_mask.sum(1) - 1
    ours = score_with_model(model, query_responses, attention_mask, last_index)
    with torch.no_grad():
        hf = model(input_ids=query_responses, attention_mask=attention_mask.long()).logits[:, 0]
    with pytest.raises(AssertionError):
        assert_close(hf[:2], ours[:2])  # rows 0 and 1 end in EOS


# ---- models: dropout and tokenizer ----


def test_disable_dropout_makes_train_mode_deterministic(gpt2_dir):
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    control = AutoModelForCausalLM.from_pretrained(gpt2_dir).train()
    assert control.config.resid_pdrop > 0  # the fixture really has dropout
    with torch.no_grad():
        with pytest.raises(AssertionError):
            assert_close(control(input_ids=ids).logits, control(input_ids=ids).logits)
        model = load_policy(gpt2_dir).train()
        assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        assert_close(disable_dropout(control)(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_load_tokenizer_pad_becomes_eos_and_pads_left(gpt2_dir, llama_dir):
    tokenizer = load_tokenizer(gpt2_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["ab:", "abcd:"], padding=True)
    assert batch["input_ids"][0][:2] == [1, 1] and batch["attention_mask"][0][:2] == [0, 0]
    llama_tokenizer = load_tokenizer(llama_dir)  # has its own pad: kept
    assert (llama_tokenizer.pad_token_id, llama_tokenizer.eos_token_id, llama_tokenizer.padding_side) == (0, 1, "left")


def test_load_tokenizer_without_eos_fails(tmp_path):
    PreTrainedTokenizerFast(tokenizer_object=toy.make_tokenizer().backend_tokenizer).save_pretrained(
        tmp_path / "no-eos"
    )
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(str(tmp_path / "no-eos"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer("./nope/model")


# ---- data ----

PROMPTS = ["abc:", "qzbmx:", "kji:", "mnop:", "xy:"]


def write_formats(tmp_path):
    """The same prompts (and a `letters` column) as .jsonl, .json, .csv, .parquet and save_to_disk."""
    from datasets import Dataset

    rows = [{"prompt": p, "letters": len(p) - 1} for p in PROMPTS]
    paths = {}
    paths["jsonl"] = tmp_path / "p.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"] = tmp_path / "p.json"
    paths["json"].write_text(json.dumps(rows))
    paths["csv"] = tmp_path / "p.csv"
    paths["csv"].write_text("prompt,letters\n" + "".join(f"{r['prompt']},{r['letters']}\n" for r in rows))
    dataset = Dataset.from_list(rows)
    paths["parquet"] = tmp_path / "p.parquet"
    dataset.to_parquet(str(paths["parquet"]))
    paths["disk"] = tmp_path / "saved"
    dataset.save_to_disk(str(paths["disk"]))
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_load_prompt_dataset_formats(tmp_path, fmt):
    dataset = load_prompt_dataset(write_formats(tmp_path)[fmt], "train")
    assert dataset["prompt"] == PROMPTS
    assert [int(x) for x in dataset["letters"]] == [len(p) - 1 for p in PROMPTS]


def test_load_prompt_dataset_split_of_saved_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_dict({"prompt": PROMPTS}), "test": Dataset.from_dict({"prompt": ["z:"]})}
    ).save_to_disk(str(tmp_path / "dd"))
    assert load_prompt_dataset(str(tmp_path / "dd"), "test")["prompt"] == ["z:"]


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "prompt\n"), ("blank.csv", "")])
def test_load_prompt_dataset_empty_file_fails_readably(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"--dataset .*{re.escape(name)}.*empty"):
        load_prompt_dataset(str(tmp_path / name), "train")


def test_load_prompt_dataset_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_prompt_dataset("./nope/prompts", "train")


def test_missing_column_error_lists_the_columns(llama_dir):
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": PROMPTS, "id": list(range(5))})
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['text', 'id'\].*--prompt-column"):
        tokenize_prompts(dataset, "prompt", load_tokenizer(llama_dir), 64, "drop", print_fn=lambda *a: None)


def saved_tokenizer_with_chat_template(tmp_path):
    """The toy tokenizer with a template that only uses characters it knows."""
    tokenizer = toy.make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "chat-tok")
    return load_tokenizer(str(tmp_path / "chat-tok"))


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path):
    from datasets import Dataset

    tokenizer = saved_tokenizer_with_chat_template(tmp_path)
    messages = [
        [{"role": "system", "content": "sort"}, {"role": "user", "content": "cab"}],
        [{"role": "user", "content": "zy"}],
    ]
    dataset = tokenize_prompts(
        Dataset.from_dict({"prompt": messages}), "prompt", tokenizer, 64, "drop", print_fn=lambda *a: None
    )
    assert dataset["prompt_text"] == ["s:sortu:caba:", "u:zya:"]
    assert dataset["input_ids"] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in dataset["prompt_text"]]
    with pytest.raises(ValueError, match="no chat template"):
        render_prompts(Dataset.from_dict({"prompt": messages}), "prompt", toy.make_tokenizer())


def test_tokenize_prompts_drops_long_prompts_and_says_so(llama_dir):
    from datasets import Dataset

    printed = []
    dataset = tokenize_prompts(
        Dataset.from_dict({"prompt": PROMPTS}), "prompt", load_tokenizer(llama_dir), 4, "drop", printed.append
    )
    assert dataset["prompt"] == ["abc:", "kji:", "xy:"]
    assert [len(x) for x in dataset["input_ids"]] == [4, 4, 3]
    assert printed == ["2 of 5 prompts are longer than --max-prompt-length 4: dropped"]


def test_tokenize_prompts_left_truncates_long_prompts_and_says_so(llama_dir):
    from datasets import Dataset

    printed = []
    prompts = ["abc:", "qzbmx:", "a?c:"]  # "?" is unknown (decodes as <pad>): a prompt that fits keeps its own text
    dataset = tokenize_prompts(
        Dataset.from_dict({"prompt": prompts}), "prompt", load_tokenizer(llama_dir), 4, "left", printed.append
    )
    tokenizer = load_tokenizer(llama_dir)
    assert dataset["input_ids"] == [
        tokenizer("abc:")["input_ids"],
        tokenizer("bmx:")["input_ids"],
        tokenizer("a?c:")["input_ids"],
    ]
    assert dataset["prompt_text"] == ["abc:", "bmx:", "a?c:"]
    assert printed == ["1 of 3 prompts are longer than --max-prompt-length 4: left-truncated"]


def test_tokenize_prompts_none_fits(llama_dir):
    from datasets import Dataset

    with pytest.raises(ValueError, match="no prompt fits in --max-prompt-length 2"):
        tokenize_prompts(
            Dataset.from_dict({"prompt": PROMPTS}), "prompt", load_tokenizer(llama_dir), 2, "drop", lambda *a: None
        )


# ---- rollout: rule rewards ----


@pytest.mark.parametrize(
    "spec, message",
    [
        ("common.toy.sort_reward", "expected 'module:function'"),
        (":sort_reward", "expected 'module:function'"),
        ("no_such_module_xyz:score", "cannot be imported"),
        ("common.toy:no_such_function", "cannot be imported"),
        ("common.toy:VERSION", "is not callable"),
    ],
)
def test_import_reward_fn_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        import_reward_fn(spec)
    assert spec in str(info.value)


def test_import_reward_fn_finds_the_function():
    assert import_reward_fn("common.toy:sort_reward") is toy.sort_reward


def test_score_with_fn_passes_eos_and_columns_and_checks_the_output():
    seen = {}

    def reward(prompts, completions, eos, **columns):
        seen.update(prompts=prompts, completions=completions, eos=eos, **columns)
        return [len(c) for c in completions]

    scores = score_with_fn(reward, ["a:", "b:"], ["xy", "z"], torch.tensor([True, False]), {"letters": [1, 1]})
    assert_close(scores, torch.tensor([2.0, 1.0]))
    assert seen == {"prompts": ["a:", "b:"], "completions": ["xy", "z"], "eos": [True, False], "letters": [1, 1]}

    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        score_with_fn(lambda **kw: [1.0], ["a:", "b:"], ["x", "y"], torch.tensor([True, True]), {})
    for bad in [float("nan"), float("inf")]:  # passed on: the script stops, or skips the batch (--skip-nonfinite)
        scores = score_with_fn(
            lambda bad=bad, **kw: [1.0, bad], ["a:", "b:"], ["x", "y"], torch.tensor([True, True]), {}
        )
        assert scores[0] == 1.0 and not torch.isfinite(scores[1])
    for returned, message in [
        ("ab", "returned str"),
        (None, "returned NoneType"),
        (0.5, "returned float"),
        (["a", "b"], "not a number"),
        ([None, 1.0], "not a number"),
    ]:
        with pytest.raises(TypeError, match=message):
            score_with_fn(
                lambda returned=returned, **kw: returned, ["a:", "b:"], ["x", "y"], torch.tensor([True, True]), {}
            )
    assert_close(
        score_with_fn(lambda **kw: torch.tensor([1.0, 2.0]), ["a:", "b:"], ["x", "y"], torch.tensor([True, True]), {}),
        torch.tensor([1.0, 2.0]),
    )

    def raising(**kw):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="the reward function raised KeyError: 'answer'") as info:
        score_with_fn(raising, ["a:"], ["x"], torch.tensor([True]), {})
    assert isinstance(info.value.__cause__, KeyError)  # its traceback is kept


@pytest.mark.parametrize(
    "prompt, completion, eos, expected",
    [
        ("cab:", "abc", True, 1.1),  # sorted, ended
        ("cab:", "abc", False, 1.0),
        ("cab:", "bac", False, 1 / 3),  # only "c" in place
        ("cab:", "abcd", True, 3 / 4 + 0.1),  # too long: divided by the response length
        ("cab:", "ab", True, 2 / 3 + 0.1),  # too short: divided by the number of letters
        ("cab:", "", True, 0.1),
    ],
)
def test_sort_reward_examples(prompt, completion, eos, expected):
    assert_close(toy.sort_reward([prompt], [completion], [eos])[0], expected)


# ---- toy task ----


def test_toy_dataset_is_deterministic_for_a_seed():
    first, again, other = (
        toy.toy_dataset(64, seed=3)["prompt"],
        toy.toy_dataset(64, seed=3)["prompt"],
        toy.toy_dataset(64, seed=4)["prompt"],
    )
    assert first == again and first != other
    for p in first:
        letters = p[:-1]
        assert p.endswith(":") and toy.MIN_LETTERS <= len(letters) <= toy.MAX_LETTERS
        assert len(set(letters)) == len(letters) and letters.isalpha() and letters.islower()


def test_toy_tokenizer_round_trips_one_token_per_character(llama_dir):
    for tokenizer in [toy.make_tokenizer(), load_tokenizer(llama_dir)]:  # built, and saved then loaded
        ids = tokenizer("qzbmx:")["input_ids"]
        assert len(ids) == 6 and len(set(ids)) == 6
        assert ids == [tokenizer.convert_tokens_to_ids(c) for c in "qzbmx:"]
        assert tokenizer.decode(ids) == "qzbmx:"
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "qzbmx:"


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_lr_scheduler_follows_transformers_curves(name):
    """The same factors as transformers' get_scheduler ("constant" with warm-up is its
    "constant_with_warmup"), update after update."""
    from transformers import get_scheduler

    from common.ops import lr_scheduler

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, out = make(optimizer), []
        for _ in range(12):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    theirs = "constant_with_warmup" if name == "constant" else name
    expected = rates(lambda opt: get_scheduler(theirs, opt, num_warmup_steps=3, num_training_steps=10))
    assert_close(rates(lambda opt: lr_scheduler(name, opt, 3, 10)), expected, atol=1e-12, rtol=0)
