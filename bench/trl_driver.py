"""Runs TRL's RLOO trainer or TRL's PPO trainer (trl 1.12, trl.experimental.ppo) once, with the
settings that bench/peer_trl.py passes, and writes a JSON file with one record per update.

Needs the `bench` extra (a separate virtual environment, see bench/README.md); bench/peer_trl.py
starts it as a subprocess. Every setting is explicit, so that a TRL default cannot differ silently
from ours; what cannot be matched is listed in bench/README.md.
"""

import argparse
import json
import os
import time

T_START = time.perf_counter()  # before the heavy imports, as the process-level clock

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback  # noqa: E402


class Recorder(TrainerCallback):
    """Wall-clock time at the end of every optimizer step and every logged metric dict."""

    def __init__(self):
        self.step_end, self.logs = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"time": time.perf_counter(), **(logs or {})})


def load_prompts(path: str) -> list:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def common_kwargs(a) -> dict:
    """TrainingArguments fields shared by both trainers: fp32 on CPU, no checkpointing, no eval,
    no saving, no reporting, a log line per update."""
    return dict(
        output_dir=a.output_dir,
        seed=a.seed,
        learning_rate=a.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_rloo(a, tokenizer, prompts, recorder):
    from trl import RLOOConfig, RLOOTrainer

    config = RLOOConfig(
        **common_kwargs(a),
        max_steps=a.updates,
        num_generations=a.k,  # TRL's k; per_device_train_batch_size counts completions, as our batch does
        max_completion_length=a.max_new_tokens,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        beta=a.kl_coef,
        epsilon=0.2,
        num_iterations=1,
        max_grad_norm=a.max_grad_norm,
        normalize_advantages=False,
        disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32},
        log_completions=False,
    )
    trainer = RLOOTrainer(
        model=a.model,
        reward_funcs=a.reward_model,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[recorder],
    )
    return trainer


def run_ppo(a, tokenizer, prompts, recorder):
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(
        **common_kwargs(a),
        total_episodes=a.updates * a.batch_size,
        num_mini_batches=1,
        num_epochs=a.num_epochs,
        local_rollout_forward_batch_size=a.batch_size,
        response_length=a.max_new_tokens,
        stop_token="eos",
        temperature=a.temperature,
        kl_coef=a.kl_coef,
        kl_estimator="k1",
        cliprange=0.2,
        vf_coef=0.1,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        num_sample_generations=0,
        sft_model_path=a.model,
        reward_model_path=a.reward_model,
    )
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(a.model, **load)
    ref_policy = AutoModelForCausalLM.from_pretrained(a.model, **load)
    reward_model = AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1, **load)
    value_model = AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1, **load)  # as ours
    ids = tokenizer(prompts)["input_ids"]
    train = Dataset.from_dict({"input_ids": ids})
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train,
        eval_dataset=train.select(range(a.batch_size)),
        callbacks=[recorder],
    )
    return trainer


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--algo", choices=["rloo", "ppo"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--reward-model", required=True)
    p.add_argument("--dataset", required=True, help=".jsonl with a 'prompt' column")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--out", required=True, help="where the JSON record goes")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="completions per update")
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    tokenizer.padding_side = "left"
    prompts = load_prompts(a.dataset)
    recorder = Recorder()
    trainer = (run_rloo if a.algo == "rloo" else run_ppo)(a, tokenizer, prompts, recorder)
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()

    # one record per update: the time its step ended (from the start of train()) and its reward
    reward_key, kl_key = ("reward", "kl") if a.algo == "rloo" else ("objective/scores", "objective/kl")
    logs = [entry for entry in recorder.logs if reward_key in entry]
    updates = []
    for i, entry in enumerate(logs):
        end = recorder.step_end[i] if i < len(recorder.step_end) else entry["time"]
        updates.append({"update": i + 1, "time": end - t_train, "score": entry[reward_key], "kl": entry.get(kl_key)})
    record = {
        "impl": "trl",
        "algo": a.algo,
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "updates": updates,
        "batch_size": a.batch_size,
        "setup_s": t_train - T_START,
        "train_s": t_end - t_train,
        "process_s": time.perf_counter() - T_START,
        "kl_note": "per-token mean (TRL RLOO)" if a.algo == "rloo" else "per-sequence sum",
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
