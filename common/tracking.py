"""What a user sees: TensorBoard under runs/, a metrics JSONL file, optional wandb, sample tables.
Called on the main process only."""

import json
import os


def init_tracking(
    run_name: str, config: dict, metrics_path: str, track: bool, wandb_project: str, resume_update: int = 0
) -> dict:
    """TensorBoard writer at runs/<run_name>, the JSONL file, and a wandb run when track is set.
    Resuming after update n drops what was logged after n, so no update appears twice."""
    from torch.utils.tensorboard import SummaryWriter

    trackers = {
        "tensorboard": SummaryWriter(
            os.path.join("runs", run_name), purge_step=resume_update + 1 if resume_update else None
        )
    }
    trackers["tensorboard"].add_text("args", "\n".join(f"{k}: {v}" for k, v in config.items()))
    os.makedirs(os.path.dirname(metrics_path) or ".", exist_ok=True)
    kept = []
    if resume_update and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [
                line for line in f if line.endswith("\n") and json.loads(line)["update"] <= resume_update
            ]  # no torn line
    tmp = metrics_path + ".tmp"  # written whole, then renamed: the file on disk never loses a finished update
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, metrics_path)
    trackers["jsonl"] = open(metrics_path, "a")
    if track:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--track logs to Weights & Biases: pip install wandb") from e
        trackers["wandb"] = wandb.init(project=wandb_project, name=run_name, config=config)
    return trackers


def log_metrics(trackers: dict, metrics: dict, step: int) -> None:
    """One JSON object per update (flushed, so a crash keeps every finished line) and the same scalars elsewhere."""
    trackers["jsonl"].write(json.dumps({"update": step, **metrics}) + "\n")
    trackers["jsonl"].flush()
    for key, value in metrics.items():
        trackers["tensorboard"].add_scalar(key, value, step)
    if "wandb" in trackers:
        trackers["wandb"].log(metrics, step=step)


def close_tracking(trackers: dict) -> None:
    trackers["tensorboard"].close()
    trackers["jsonl"].close()
    if "wandb" in trackers:
        trackers["wandb"].finish()


def samples_table(prompts: list, completions: list, scores: list, rows: int = 4, width: int = 48) -> str:
    """A plain-text table of the first rows (prompt, completion, score), newlines shown as ⏎."""

    def cell(text: str) -> str:
        text = text.replace("\n", "⏎")
        return text if len(text) <= width else "…" + text[-(width - 1) :]

    lines = [f"{'prompt':>{width}} | {'completion':<{width}} | score"]
    for p, c, s in list(zip(prompts, completions, scores))[:rows]:
        lines.append(f"{cell(p):>{width}} | {cell(c):<{width}} | {s:.3f}")
    return "\n".join(lines)
