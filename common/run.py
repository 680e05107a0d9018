"""Run management, out of the algorithm's way: one object a script creates at the start, calls once
per update and once at the end. It owns the output directory (lock, finished marker), the argument
checks shared by every script, the toy-task defaults, resume (lookup, checks, checksums), logging
(metrics.jsonl, TensorBoard, wandb, progress bar, sample tables), the clock of each phase of an
update (time/*), the held-out evaluation's schedule (common/evaluation.py does the work),
Ctrl-C/SIGTERM, periodic checkpoints and the final save.

Guarantees (tested in tests/test_faults.py and tests/test_resume.py):
- metrics.jsonl holds every finished update at every instant; a resumed run drops what was logged
  after its checkpoint, so no update appears twice.
- A checkpoint exists only once complete (written to a hidden folder, then renamed) and carries a
  checksum of every file, verified on resume. A failed write is removed and the previous kept.
- The trained model is written to a hidden folder and moved into place; `finished.json` is
  written last, so a folder either holds a finished run or can be resumed.
- One run per output directory (a lock held for the run's lifetime).
- SIGINT/SIGTERM: the update finishes, a checkpoint is written, the resume command is printed; on
  the last update the run simply finishes. A second signal stops at once, without a traceback.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from functools import partial

import torch
from tqdm.auto import tqdm

from common import checkpoint
from common.checks import check_args
from common.evaluation import check_eval_args, evaluate, held_out_fraction, load_eval_prompts
from common.lora import model_to_save
from common.tracking import close_tracking, init_tracking, log_metrics, samples_table
from common.vllm_engine import close_engines

FINISHED = "finished.json"
PHASES = ("rollout", "score", "logprobs", "update")  # the ticks of an update, in order


class Run:
    """Set-up checks and run state for one training run of `script` (its __file__)."""

    def __init__(self, args, accelerator, script: str):
        self.args, self.accelerator = args, accelerator
        self.algorithm = os.path.basename(script)[: -len(".py")]
        check_args(args, accelerator)  # raises a readable error before anything is loaded
        check_eval_args(args)
        args.run_name = args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"
        args.output_dir = args.output_dir or os.path.join("output", args.run_name)
        self.lock = checkpoint.lock_output_dir(args.output_dir, accelerator)
        finished = os.path.exists(os.path.join(args.output_dir, FINISHED))
        if args.resume_from is None:
            checkpoint.check_new_run(args.output_dir, args.overwrite)
        elif finished and args.resume_from == "latest":
            self._nothing_to_do()
        if args.model is None:  # the built-in toy task
            from common.toy import build_toy

            with accelerator.main_process_first():
                args.model = build_toy(print_fn=accelerator.print)
            if args.reward_model is None and args.reward_fn is None:
                args.reward_fn = "common.toy:sort_reward"
        self.resume_path, state = None, {"update": 0, "skipped_batches": 0}
        if args.resume_from is not None:
            self.resume_path, state = checkpoint.find_checkpoint(args, self.algorithm)
            if finished:
                self._nothing_to_do()
            args.run_name = state["run_name"]  # continue the same TensorBoard run
            if state.get("held_out", held_out_fraction(args)) != held_out_fraction(args):
                raise ValueError(
                    f"--resume-from {self.resume_path}: that run held out {state['held_out']} of --dataset for "
                    f"evaluation, this one would hold out {held_out_fraction(args)}: the training prompts would "
                    "differ; resume with its --eval-every (0 or not), --eval-fraction, --eval-dataset and --eval-split"
                )
            if state["update"] >= args.num_updates:
                accelerator.print(
                    f"{self.resume_path} is after the last update ({args.num_updates}): saving the policy only"
                )
        self.start_update, self.skipped_batches = state["update"], state["skipped_batches"]
        self.metrics, self.stop_signal, self.trackers, self.progress = None, None, {}, None
        self.elapsed_before = state.get("elapsed", 0.0)  # wall seconds of the updates before the checkpoint
        self.eval_prompts, self.evaluate = None, None
        self.phase_seconds, self.tokens, self.clock = {}, {}, time.perf_counter()

    def _nothing_to_do(self):
        self.accelerator.print(f"{self.args.output_dir} holds a finished run (finished.json): nothing to resume")
        checkpoint.unlock_output_dir(self.lock)
        raise SystemExit(0)

    def hold_out_eval_prompts(self, dataset, tokenizer):
        """With --eval-every: keep the evaluation prompts (common/evaluation.py says which) and return
        the training prompts, from which held-out ones are removed. Without, the dataset as it is."""
        min_prompts = self.args.batch_size // getattr(self.args, "num_generations", 1)  # one update's prompts
        dataset, self.eval_prompts = load_eval_prompts(
            self.args, tokenizer, dataset, min_prompts, self.accelerator.print
        )
        return dataset

    # ---- after prepare() ----

    def resume(self) -> int:
        """Load the checkpoint's weights, optimizer, registered scheduler and every process's RNG
        states (call after prepare() and register_for_checkpointing()); start the trackers, the
        progress bar and the signal handlers. Returns the number of updates already done."""
        args, accelerator = self.args, self.accelerator
        if self.resume_path is not None:
            checkpoint.verify(self.resume_path, args.output_dir)
            accelerator.load_state(self.resume_path)
            accelerator.print(f"resumed from {self.resume_path} after update {self.start_update}")
        if accelerator.is_main_process:
            metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
            self.trackers = init_tracking(
                args.run_name, asdict(args), metrics_path, args.track, args.wandb_project, self.start_update
            )
            accelerator.print(
                f"{args.run_name}: {args.num_updates} updates of {args.batch_size} responses "
                f"({args.world_size} process(es) x {args.local_batch_size}), logs in runs/{args.run_name}"
            )
        self.progress = tqdm(
            total=args.num_updates,
            initial=self.start_update,
            desc=args.exp_name,
            disable=None if accelerator.is_main_process else True,
        )
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        checkpoint.die_with_parent()  # a launcher killed by SIGTERM passes it on to us
        self.start_time = time.time()
        self.clock = time.perf_counter()
        return self.start_update

    def start_evaluation(self, tokenizer, reward, ref_policy) -> None:
        """With --eval-every N: evaluate on the held-out prompts now (a new run's update 0, its own line
        in metrics.jsonl), after every N-th update and after the last (in log()). Before training the
        policy is the reference, a frozen copy of the starting policy, which is evaluated in its place."""
        if self.eval_prompts is None:
            return
        args = self.args
        self.evaluate = partial(evaluate, args, self.accelerator, self.eval_prompts, tokenizer, reward, ref_policy)
        if self.start_update == 0:
            metrics = {"episode": 0, **self._evaluate(ref_policy, 0), "time/elapsed": self._elapsed()}
            if self.accelerator.is_main_process:
                log_metrics(self.trackers, metrics, 0)
        self.clock = time.perf_counter()

    def _evaluate(self, model, update: int) -> dict:
        """The evaluation's metrics and time; its table of greedy answers is printed."""
        self._synchronize()
        start = time.perf_counter()
        metrics, (prompts, completions, scores) = self.evaluate(model, update)
        self._synchronize()
        metrics["time/eval"] = time.perf_counter() - start
        if self.accelerator.is_main_process:
            self.progress.write(
                f"eval after update {update} ({len(self.eval_prompts)} held-out prompts, greedy): score "
                f"{metrics['eval/scores']:.3f} | kl {metrics['eval/kl']:.3f}"
                f" | response length {metrics['eval/response_length']:.1f}"
            )
            self.progress.write(samples_table(prompts, completions, scores.tolist()))
        return metrics

    def _synchronize(self) -> None:
        """Wait for the device's queued work, so that the clock measures work and not its launch."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)

    def _elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # the second one: stop now
            print(f"\n{signal.Signals(signum).name} again: stopping without a checkpoint", flush=True)
            os._exit(128 + signum)
        self.stop_signal = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this update, then writing a checkpoint (again to stop now)",
            flush=True,
        )

    # ---- once per update ----

    def tick(self, phase: str, tokens: torch.Tensor | None = None) -> None:
        """A phase of the update ends: the wall seconds since the previous tick (or since the update
        began) are logged as time/<phase>, and the True entries of `tokens` (a mask) are counted for
        time/<generated or trained>_tokens_per_second."""
        self._synchronize()
        now = time.perf_counter()
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - self.clock
        self.clock = now
        if tokens is not None:
            self.tokens[phase] = self.tokens.get(phase, 0) + tokens.sum()

    def all_finite(self, update: int, **tensors) -> bool:
        """True when every tensor is finite on every process. Otherwise stop with an error naming the
        quantities (before anything is updated), or, with --skip-nonfinite, count the batch as
        skipped and return False so that every process skips it together."""
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        device = next(iter(tensors.values())).device
        if self.accelerator.reduce(torch.tensor(float(len(bad)), device=device)).item() == 0:
            return True
        if not self.args.skip_nonfinite:
            raise FloatingPointError(
                f"update {update}: non-finite {', '.join(bad) or 'values on another process'}; stopped before "
                "updating (the last checkpoint is intact; --skip-nonfinite skips such batches instead)"
            )
        self.skipped_batches += 1
        self.accelerator.print(
            f"update {update}: non-finite {', '.join(bad) or 'values on another process'}: batch skipped"
        )
        self.end_update(update)
        return False

    def log(self, update: int, metrics: dict, samples: tuple, policy=None) -> None:
        """Log one update's metrics (gathered already) with the run's counters and times, write the
        progress line and, every --print-samples-every updates, a table of samples (prompts,
        completions, scores). With --eval-every N, after every N-th and the last update, first
        evaluate `policy` (the trained model as prepare() returned it) on the held-out prompts."""
        args = self.args
        evaluate = self.evaluate is not None and policy is not None
        if evaluate and (update % args.eval_every == 0 or update == args.num_updates):
            metrics.update(self._evaluate(policy, update))
        metrics.update({"time/eval": metrics.get("time/eval", 0.0), **self._times()})
        metrics.update(
            {
                "episode": update * args.batch_size,
                "val/skipped_batches": self.skipped_batches,
                "time/episodes_per_second": (update - self.start_update)
                * args.batch_size
                / (time.time() - self.start_time),
            }
        )
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"update {update}: non-finite metrics {metrics}")
        self.metrics = metrics
        if self.accelerator.is_main_process:
            log_metrics(self.trackers, metrics, update)
            self.progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            phases = sum(metrics[f"time/{p}"] for p in PHASES)
            self.progress.write(
                f"update {update}/{args.num_updates} | episode {metrics['episode']}"
                f" | score {metrics['objective/scores']:.3f} | kl {metrics['objective/kl']:.3f}"
                f" | rlhf_reward {metrics['objective/rlhf_reward']:.3f} | entropy {metrics['objective/entropy']:.2f}"
                f" | episodes/s {metrics['time/episodes_per_second']:.0f}"
                f" | generating {metrics['time/rollout'] / max(phases, 1e-9):.0%}"
            )
            if update == args.num_updates or (args.print_samples_every and update % args.print_samples_every == 0):
                prompts, completions, scores = samples
                self.progress.write(samples_table(prompts, completions, scores.tolist()))

    def _times(self) -> dict:
        """time/*: the seconds of each phase of this update, token rates over all processes, and the
        wall time since the run began (the updates before a resume included)."""
        args, accelerator = self.args, self.accelerator
        seconds = {p: self.phase_seconds.get(p, 0.0) for p in PHASES}
        counts = [torch.as_tensor(self.tokens.get(p, 0), device=accelerator.device) for p in ("rollout", "update")]
        generated, trained = accelerator.reduce(torch.stack(counts).double(), reduction="sum").tolist()
        trained *= getattr(args, "num_epochs", 1)  # every epoch runs the batch's tokens forward and backward
        return {
            **{f"time/{p}": s for p, s in seconds.items()},
            "time/generated_tokens_per_second": generated / max(seconds["rollout"], 1e-9),
            "time/trained_tokens_per_second": trained / max(seconds["update"], 1e-9),
            "time/elapsed": self._elapsed(),
        }

    def end_update(self, update: int) -> None:
        """Write a checkpoint every --save-every updates and when asked to stop; after a stop
        signal, exit with the resume command (on the last update the run just finishes)."""
        args, accelerator = self.args, self.accelerator
        self.progress.update(1)
        asked = float(self.stop_signal is not None)
        stopping = accelerator.reduce(torch.tensor(asked, device=accelerator.device)).item() > 0
        stopping = stopping and update < args.num_updates
        if stopping or (args.save_every and update % args.save_every == 0):
            state = {
                "algorithm": self.algorithm,
                "update": update,
                "run_name": args.run_name,
                "skipped_batches": self.skipped_batches,
                "elapsed": self._elapsed(),
                "held_out": held_out_fraction(args),
                **checkpoint.run_shape(args),
            }
            path = checkpoint.save(accelerator, args.output_dir, state, args.keep_last)
            accelerator.print(f"checkpoint: {path}")
        if stopping:
            self.progress.close()
            accelerator.print(f"stopped after update {update}; {checkpoint.resume_command(sys.argv, args)}")
            self._close()
            close_engines()  # --vllm: while the process groups are still up
            raise SystemExit(128 + (self.stop_signal or signal.SIGTERM))
        self.phase_seconds, self.tokens, self.clock = {}, {}, time.perf_counter()  # the next update's clock starts

    # ---- at the end ----

    def save(self, model, state_dict: dict, tokenizer) -> dict:
        """Save the trained model (state_dict gathered by accelerator.get_state_dict on every process)
        and tokenizer to --output-dir, mark the run finished, and leave; returns the last metrics."""
        args, accelerator = self.args, self.accelerator
        self.progress.close()
        if self.metrics is None and self.start_update < args.num_updates:
            raise FloatingPointError(
                f"every batch of updates {self.start_update + 1}-{args.num_updates} held non-finite values and was "
                "skipped (--skip-nonfinite): nothing was trained; check the reward and the learning rate"
            )
        model, state_dict = model_to_save(model, state_dict, args)  # LoRA: the adapter, or with --merge-lora merged
        checkpoint.save_final(accelerator, args.output_dir, model, state_dict, tokenizer)
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, FINISHED), "w") as f:  # written last: the run is complete
                json.dump({"algorithm": self.algorithm, "updates": args.num_updates, "run_name": args.run_name}, f)
            accelerator.print(f"saved the trained policy and tokenizer to {args.output_dir}")
        metrics = self.metrics if self.metrics is not None else checkpoint.last_logged(args.output_dir)
        self._close()
        for s in (signal.SIGINT, signal.SIGTERM):  # everything is saved: a signal may now end us at once
            signal.signal(s, signal.SIG_DFL)
        # Leave together, but never hang: gloo's teardown can block when a peer is already gone.
        watchdog = threading.Timer(120, os._exit, args=(0,))
        watchdog.daemon = True
        watchdog.start()
        accelerator.wait_for_everyone()
        close_engines()  # --vllm
        accelerator.end_training()
        watchdog.cancel()
        return metrics

    def _close(self) -> None:
        if self.accelerator.is_main_process and self.trackers:
            close_tracking(self.trackers)
            self.trackers = {}
        checkpoint.unlock_output_dir(self.lock)
