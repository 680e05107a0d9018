"""Prompt datasets: load (hub id, directory or file), render, tokenize, drop or truncate long prompts."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `datasets` is imported where it is used: a script's --help must not wait for it
    from datasets import Dataset

from common.models import max_positions

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED = (
    "a .json, .jsonl, .parquet or .csv file, a directory (saved with save_to_disk, or of data files) or a hub id"
)


def load_data_file(name: str, path: str, file_type: str) -> Dataset:
    """One json/parquet/csv file. An empty file makes `datasets` raise a bare StopIteration (.jsonl)
    or "corresponds to no data" (.json, .csv): turn both into an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dataset {name!r}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--dataset {name!r} is empty")
    from datasets import load_dataset

    try:
        return load_dataset(file_type, data_files=path, split="train")
    except Exception as e:  # no rows, malformed file
        raise ValueError(
            f"--dataset {name!r} could not be read as {file_type} (empty or malformed?): {type(e).__name__}: {e}"
        ) from e


def load_saved_dataset(name: str, path: str, split: str) -> Dataset:
    """A directory written by save_to_disk: a Dataset, or one split of a DatasetDict (read alone, so
    the other splits cost nothing). An empty dataset is saved without data files, on which
    load_from_disk fails with an IndexError."""
    splits_file = os.path.join(path, "dataset_dict.json")
    if os.path.exists(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)["splits"]
        if split not in splits:
            raise ValueError(f"--dataset-split {split!r}: --dataset {name!r} has the splits {splits}")
        path = os.path.join(path, split)
    from datasets import load_from_disk

    try:
        return load_from_disk(path)
    except IndexError as e:
        raise ValueError(f"--dataset {name!r} (split {split!r}) is empty") from e


def load_prompt_dataset(name: str, split: str) -> Dataset:
    """A hub id, a directory (saved with save_to_disk, or data files), or a .json/.jsonl/.parquet/.csv file."""
    from datasets import load_dataset

    path = os.path.expanduser(name)
    ext = os.path.splitext(path)[1].lower()
    if ext in FILE_TYPES:
        if split != "train":  # load_dataset would name it "train" whatever we ask for
            raise ValueError(
                f"--dataset-split {split!r}: --dataset {name!r} is a single file, with only the split 'train'"
            )
        dataset = load_data_file(name, path, FILE_TYPES[ext])
    elif os.path.isfile(path):
        raise ValueError(f"--dataset {name!r}: unsupported format; give {SUPPORTED}")
    elif os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            dataset = load_saved_dataset(name, path, split)
        else:
            try:
                dataset = load_dataset(path, split=split)
            except Exception as e:  # unknown split, unreadable files
                raise ValueError(f"--dataset {name!r} (--dataset-split {split!r}) could not be loaded: {e}") from e
    elif name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"--dataset {name!r}: no such file or directory")
    else:
        try:
            dataset = load_dataset(name, split=split)
        except Exception as e:  # offline, unknown id, unknown split
            raise OSError(f"--dataset {name!r} (split {split!r}) could not be loaded: {e}") from e
    if len(dataset) == 0:
        raise ValueError(f"--dataset {name!r} (split {split!r}) is empty")
    return dataset


def render_prompts(dataset: Dataset, column: str, tokenizer) -> list:
    """The prompt column as text: strings as they are, lists of chat messages through the
    tokenizer's chat template with the generation prompt appended."""
    if column not in dataset.column_names:
        raise ValueError(
            f"the dataset has no column {column!r}; its columns are {dataset.column_names}: set --prompt-column"
        )
    values = list(dataset[column])
    nulls = [i for i, value in enumerate(values) if value is None]
    if nulls:
        raise ValueError(
            f"--prompt-column {column!r}: row {nulls[0]} (counting from 0) is null, {len(nulls)} rows in all; "
            "drop or fill them"
        )
    first = values[0]
    if isinstance(first, str):
        return values
    if isinstance(first, list) and first and isinstance(first[0], dict) and "content" in first[0]:
        if tokenizer.chat_template is None:
            raise ValueError(f"column {column!r} holds chat messages but the tokenizer has no chat template")
        return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in values]
    raise ValueError(
        f"column {column!r} must hold strings or lists of {{'role', 'content'}} messages, got {type(first).__name__}"
    )


def tokenize_prompts(
    dataset: Dataset, column: str, tokenizer, max_prompt_length: int, truncation: str, print_fn=print
) -> Dataset:
    """Adds `input_ids` and the rendered `prompt_text`. Prompts longer than max_prompt_length are
    dropped or left-truncated (truncation = "drop" | "left"), and the count is printed."""
    texts = render_prompts(dataset, column, tokenizer)
    is_chat = not isinstance(dataset[0][column], str)  # the template already holds the special tokens
    ids = tokenizer(texts, add_special_tokens=not is_chat)["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_length]
    if truncation == "left":  # only the truncated prompts get a new text, decoded from what is kept
        for i in too_long:
            ids[i] = ids[i][-max_prompt_length:]
            texts[i] = tokenizer.decode(ids[i])
    dataset = dataset.add_column("input_ids", ids).add_column("prompt_text", texts)
    if too_long:
        verb = "left-truncated" if truncation == "left" else "dropped"
        print_fn(
            f"{len(too_long)} of {len(dataset)} prompts are longer than --max-prompt-length {max_prompt_length}: {verb}"
        )
        if truncation == "drop":
            dataset = dataset.select(sorted(set(range(len(dataset))) - set(too_long)))
    if len(dataset) == 0:
        raise ValueError(f"no prompt fits in --max-prompt-length {max_prompt_length}")
    return dataset


def make_collator(tokenizer):
    """Left-pads input_ids to the longest prompt of the batch; the other columns stay lists."""

    def collate(rows: list) -> dict:
        batch = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, padding=True, return_tensors="pt")
        extra = {k: [r[k] for r in rows] for k in rows[0] if k != "input_ids"}
        return {"queries": batch["input_ids"], "query_mask": batch["attention_mask"].bool(), **extra}

    return collate


def repeat_forever(dataloader, skip: int = 0):
    """Batches epoch after epoch. With Accelerate's seedable sampler the order of epoch e depends
    only on (seed, e), so a resumed run skips the `skip` batches already used and continues exactly."""
    epoch, skip = divmod(skip, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        for i, batch in enumerate(dataloader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def load_prompts(args, tokenizer, min_prompts: int, print_fn=print) -> Dataset:
    """--dataset (or the toy task's prompts) tokenized, with the checks that need the tokens: at least
    min_prompts prompts (one update's worth), and prompt + --max-new-tokens within the model's positions."""
    from common.toy import toy_dataset

    raw = toy_dataset() if args.dataset is None else load_prompt_dataset(args.dataset, args.dataset_split)
    dataset = tokenize_prompts(
        raw, args.prompt_column, tokenizer, args.max_prompt_length, args.prompt_truncation, print_fn
    )
    if len(dataset) < min_prompts:
        raise ValueError(f"{len(dataset)} prompts are fewer than the {min_prompts} one update needs")
    check_positions(args, dataset)
    return dataset


def check_positions(args, dataset: Dataset) -> None:
    """The longest prompt plus --max-new-tokens must fit in --model's positions (max_position_embeddings,
    GPT-2's n_positions): past them an absolute-position model fails inside generate() with an IndexError."""
    limit = max_positions(args.model, args.trust_remote_code)
    longest = max(len(ids) for ids in dataset["input_ids"])
    if limit is not None and longest + args.max_new_tokens > limit:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} + the longest prompt ({longest} tokens) exceed the {limit} "
            f"positions of --model {args.model!r}: lower --max-new-tokens or --max-prompt-length"
        )


def columns_for_reward(batch: dict, repeats: int) -> dict:
    """The dataset's other columns, each value repeated for the `repeats` responses of its prompt."""
    skip = {"queries", "query_mask", "prompt_text", "input_ids"}
    return {k: [v for v in vals for _ in range(repeats)] for k, vals in batch.items() if k not in skip}
