"""Prompt datasets: load (hub id, directory or file), render, tokenize, drop or truncate long prompts."""

import os

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_data_file(name: str, path: str, file_type: str) -> Dataset:
    """One json/parquet/csv file. An empty file makes `datasets` raise a bare StopIteration (.jsonl)
    or "corresponds to no data" (.json, .csv): turn both into an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dataset {name!r}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--dataset {name!r} is empty")
    try:
        return load_dataset(file_type, data_files=path, split="train")
    except Exception as e:  # no rows, malformed file
        raise ValueError(
            f"--dataset {name!r} could not be read as {file_type} (empty or malformed?): {type(e).__name__}: {e}"
        ) from e


def load_prompt_dataset(name: str, split: str) -> Dataset:
    """A hub id, a directory (saved with save_to_disk, or data files), or a .json/.jsonl/.parquet/.csv file."""
    path = os.path.expanduser(name)
    ext = os.path.splitext(path)[1].lower()
    if ext in FILE_TYPES:
        dataset = load_data_file(name, path, FILE_TYPES[ext])
    elif os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            dataset = load_from_disk(path)
            dataset = dataset[split] if isinstance(dataset, DatasetDict) else dataset
        else:
            dataset = load_dataset(path, split=split)
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
    first = dataset[0][column]
    if isinstance(first, str):
        return list(dataset[column])
    if isinstance(first, list) and first and isinstance(first[0], dict) and "content" in first[0]:
        if tokenizer.chat_template is None:
            raise ValueError(f"column {column!r} holds chat messages but the tokenizer has no chat template")
        return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in dataset[column]]
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
    return dataset


def columns_for_reward(batch: dict, repeats: int) -> dict:
    """The dataset's other columns, each value repeated for the `repeats` responses of its prompt."""
    skip = {"queries", "query_mask", "prompt_text", "input_ids"}
    return {k: [v for v in vals for _ in range(repeats)] for k, vals in batch.items() if k not in skip}
