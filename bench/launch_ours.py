"""Runs one of our scripts in-process with timing and memory probes, measured from outside: the
script module is imported, a few of its names are replaced by wrappers, and its own
`main(tyro.cli(Args))` runs unchanged. Nothing in rloo.py, remax.py, ppo.py or common/ is edited.

    python bench/launch_ours.py --script rloo --out run.json -- --model ... --reward-model ... --dataset ...

Wrapped names (looked up in the script's module at call time):
  generate              rollout time; generated tokens (up to and including the first EOS)
  repeat_forever        an update starts when its batch is drawn
  log_metrics           an update ends when its metrics are logged
  forward, scalar_head_values
                        no-grad forward time per model; the first forward with grad on marks the start
                        of the update phase; tokens (attention mask) through the training forwards
  selective_log_softmax with grad on: bytes saved for backward that are not the logits themselves
  torch.optim.AdamW.step  optimizer time
A thread samples RSS every 5 ms and keeps the peak of each phase.

Also two micro-checks that need no script:
    python bench/launch_ours.py --logsoftmax-check VARIANT B T V TEMPERATURE
    python bench/launch_ours.py --adam-check PARAMS_MILLIONS
"""

import argparse
import importlib
import json
import os
import resource
import sys
import threading
import time

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: reset this process's RSS high-water mark (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Probe:
    """Per-update timings and counters, and the RSS peak of each phase."""

    def __init__(self):
        self.phase = "setup"
        self.phase_peak = {}
        self.updates = []
        self.current = None
        self.model_labels = {}
        self.policy_id = None
        self.saved = []  # per training selective_log_softmax call: (logits bytes, extra saved bytes)
        self.adam_s = 0.0
        self.rss_after_imports = None
        self.rss_at_first_update = None
        self._stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop:
            r = rss_mib()
            self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0.0), r)
            time.sleep(0.005)

    def set_phase(self, phase):
        r = rss_mib()
        self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0.0), r)
        self.phase = phase

    def start_update(self):
        if self.rss_at_first_update is None:
            self.rss_at_first_update = rss_mib()
        self.current = {
            "start": time.perf_counter(), "generate_s": 0.0, "score_s": 0.0, "nograd_forward_s": {}, "entropy_s": 0.0,
            "update_start": None, "adam_s": 0.0, "generated_tokens": 0, "generated_positions": 0, "generate_calls": 0,
            "train_tokens": 0, "train_rows": 0,
        }
        self.adam_s = 0.0
        self.set_phase("rollout")

    def end_update(self):
        c = self.current
        c["end"] = time.perf_counter()
        c["adam_s"] = self.adam_s
        self.updates.append(c)
        self.set_phase("between updates")

    def label(self, model) -> str:
        key = id(model)
        if key not in self.model_labels:
            self.model_labels[key] = f"model{len(self.model_labels)}"
        return self.model_labels[key]


def instrument(module, probe: Probe):
    import torch

    from common.ops import first_true_indices

    orig = {name: getattr(module, name) for name in ("generate", "repeat_forever", "log_metrics", "forward", "selective_log_softmax")}
    orig_entropy = getattr(module, "entropy_from_logits", None)
    orig_score = getattr(module, "score_responses", None)
    orig_scalar = getattr(module, "scalar_head_values", None)

    def generate(model, queries, query_mask, config, *args, **kwargs):
        probe.set_phase("generate")
        t = time.perf_counter()
        responses = orig["generate"](model, queries, query_mask, config, *args, **kwargs)
        c = probe.current
        c["generate_s"] += time.perf_counter() - t
        c["generate_calls"] += 1
        T = responses.shape[1]
        eos = first_true_indices(responses == config.eos_token_id)  # T where a row has none
        c["generated_tokens"] += int(torch.clamp(eos + 1, max=T).sum())
        c["generated_positions"] += responses.numel()
        probe.set_phase("score + log-probs")
        return responses

    def repeat_forever(*args, **kwargs):
        for batch in orig["repeat_forever"](*args, **kwargs):
            probe.start_update()
            yield batch

    def log_metrics(*args, **kwargs):
        probe.end_update()
        return orig["log_metrics"](*args, **kwargs)

    def timed_forward(fn, model, input_ids, attention_mask, *args, **kwargs):
        c = probe.current
        if torch.is_grad_enabled():
            if c["update_start"] is None:
                c["update_start"] = time.perf_counter()
                probe.set_phase("update")
            return fn(model, input_ids, attention_mask, *args, **kwargs)
        t = time.perf_counter()
        out = fn(model, input_ids, attention_mask, *args, **kwargs)
        label = probe.label(model)
        c["nograd_forward_s"][label] = c["nograd_forward_s"].get(label, 0.0) + time.perf_counter() - t
        return out

    def forward(model, input_ids, attention_mask, *args, **kwargs):
        if torch.is_grad_enabled() and probe.current is not None:
            probe.policy_id = probe.label(model)
            probe.current["train_tokens"] += int(attention_mask.sum())
            probe.current["train_rows"] += input_ids.shape[0]
        return timed_forward(orig["forward"], model, input_ids, attention_mask, *args, **kwargs)

    def scalar_head_values(model, input_ids, attention_mask, *args, **kwargs):
        return timed_forward(orig_scalar, model, input_ids, attention_mask, *args, **kwargs)

    def selective_log_softmax(logits, labels, *args, **kwargs):
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return orig["selective_log_softmax"](logits, labels, *args, **kwargs)
        base = logits.untyped_storage().data_ptr()
        seen, extra = set(), [0]

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() != base and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                extra[0] += s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = orig["selective_log_softmax"](logits, labels, *args, **kwargs)
        probe.saved.append({"logits_bytes": logits.untyped_storage().nbytes(), "logits_shape": list(logits.shape),
                            "extra_saved_bytes": extra[0]})
        return out

    def entropy_from_logits(*args, **kwargs):
        t = time.perf_counter()
        out = orig_entropy(*args, **kwargs)
        probe.current["entropy_s"] += time.perf_counter() - t
        return out

    def score_responses(*args, **kwargs):
        t = time.perf_counter()
        out = orig_score(*args, **kwargs)
        probe.current["score_s"] += time.perf_counter() - t
        return out

    module.generate, module.repeat_forever, module.log_metrics = generate, repeat_forever, log_metrics
    module.forward, module.selective_log_softmax = forward, selective_log_softmax
    if orig_entropy is not None:
        module.entropy_from_logits = entropy_from_logits
    if orig_score is not None:
        module.score_responses = score_responses
    if orig_scalar is not None:
        module.scalar_head_values = scalar_head_values

    adam_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        t = time.perf_counter()
        out = adam_step(self, *args, **kwargs)
        probe.adam_s += time.perf_counter() - t
        return out

    torch.optim.AdamW.step = step


def run_script(a, rest):
    import torch
    import tyro

    probe = Probe()
    module = importlib.import_module(a.script)
    probe.rss_after_imports = rss_mib()
    t_imports = time.perf_counter()
    instrument(module, probe)
    args = tyro.cli(module.Args, args=rest)
    t_main = time.perf_counter()
    module.main(args)
    t_end = time.perf_counter()
    probe._stop = True
    probe.set_phase("end")
    record = {
        "script": a.script, "threads": torch.get_num_threads(), "args": rest,
        "imports_s": t_imports - T0, "main_s": t_end - t_main, "process_s": t_end - T0,
        "rss_after_imports_mib": probe.rss_after_imports, "rss_at_first_update_mib": probe.rss_at_first_update,
        "peak_rss_mib": peak_rss_mib(), "phase_peak_rss_mib": probe.phase_peak,
        "policy_label": probe.policy_id, "updates": [], "logsoftmax_saved": probe.saved[:4],
    }
    for u in probe.updates:
        step = u["end"] - u["start"]
        update = u["end"] - u["update_start"] if u["update_start"] else float("nan")
        record["updates"].append({
            "step_s": step, "generate_s": u["generate_s"], "update_s": update, "adam_s": u["adam_s"],
            "score_s": u["score_s"], "entropy_s": u["entropy_s"], "nograd_forward_s": u["nograd_forward_s"],
            "other_rollout_s": step - update - u["generate_s"], "generated_tokens": u["generated_tokens"],
            "generated_positions": u["generated_positions"], "generate_calls": u["generate_calls"],
            "train_tokens": u["train_tokens"], "train_rows": u["train_rows"],
        })
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)


# ---- micro-checks ----


class RowLogSoftmax:
    """A sketch of the fix proposed in bench/README.md (not used by the scripts): log-probs of the
    labels with a backward that recomputes softmax row by row, so nothing but the logits (which
    exist anyway) and the (B, T) logsumexp is kept for backward."""

    @staticmethod
    def apply(logits, labels, temperature):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, logits, labels):
                lse = torch.stack([torch.logsumexp(row.float() / temperature, dim=-1) for row in logits])  # (B, T)
                chosen = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float() / temperature
                ctx.save_for_backward(logits, labels, lse)
                return chosen - lse

            @staticmethod
            def backward(ctx, grad):
                logits, labels, lse = ctx.saved_tensors
                out = torch.empty_like(logits)
                for b in range(logits.shape[0]):  # one (T, V) temporary at a time
                    p = torch.exp(logits[b].float() / temperature - lse[b].unsqueeze(-1))
                    p.mul_(-grad[b].unsqueeze(-1))
                    p.scatter_add_(-1, labels[b].unsqueeze(-1), grad[b].unsqueeze(-1))
                    out[b] = p / temperature
                return out, None

        return Fn.apply(logits, labels)


def logsoftmax_check(variant: str, B: int, T: int, V: int, temperature: float) -> dict:
    """Forward + backward of the label log-probs of (B, T, V) fp32 logits that come out of a
    linear layer (as an LM head's do). Reports what is kept for backward besides the logits and the
    RSS peak above the state before the call, in a fresh process per variant."""
    import torch

    from common.ops import selective_log_softmax

    torch.manual_seed(0)
    H = 64
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H)
    labels = torch.randint(0, V, (B, T))
    logits = head(hidden)  # (B, T, V), non-leaf: the linear keeps hidden and weight, not the logits
    fn = {
        "ours": lambda x: selective_log_softmax(x, labels, temperature),
        "naive": lambda x: torch.log_softmax(x / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1),
        "proposed": lambda x: RowLogSoftmax.apply(x, labels, temperature),
    }[variant]
    base = logits.untyped_storage().data_ptr()
    seen, extra = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() != base and s.data_ptr() not in seen and t.numel() > B * T:
            seen.add(s.data_ptr())
            extra[0] += s.nbytes()
        return t

    before = rss_mib()
    reset_peak_rss()
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logprobs = fn(logits)
    logprobs.sum().backward()
    elapsed = time.perf_counter() - t
    peak = vm_hwm_mib()
    logits_mib = logits.numel() * 4 / 2**20
    return {
        "variant": variant, "B": B, "T": T, "V": V, "temperature": temperature, "logits_mib": logits_mib,
        "extra_saved_for_backward_mib": extra[0] / 2**20, "rss_peak_above_start_mib": peak - before,
        "seconds": elapsed,
    }


def adam_check(millions: float) -> dict:
    """Seconds per AdamW step over `millions` M fp32 parameters, as the scripts build it
    (torch.optim.AdamW defaults: on CPU the per-tensor loop) and with foreach=True / fused=True."""
    import torch

    torch.manual_seed(0)
    shapes = [(768, 768)] * 4 + [(3072, 768)] * 3  # one Llama layer of hidden 768
    per_layer = sum(a * b for a, b in shapes)
    layers = max(1, round(millions * 1e6 / per_layer))
    out = {"params": layers * per_layer}
    for name, kw in [("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
        params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for _ in range(layers) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.AdamW(params, lr=1e-6, **kw)
        opt.step()  # allocates the state
        t = time.perf_counter()
        for _ in range(3):
            opt.step()
        out[f"{name}_s"] = (time.perf_counter() - t) / 3
        del params, opt
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", choices=["rloo", "remax", "ppo"])
    p.add_argument("--out")
    p.add_argument("--logsoftmax-check", nargs=5, metavar=("VARIANT", "B", "T", "V", "TEMPERATURE"))
    p.add_argument("--adam-check", type=float, metavar="PARAMS_MILLIONS")
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    a = p.parse_args(argv)
    if a.logsoftmax_check:
        v, B, T, V, temp = a.logsoftmax_check
        print(json.dumps(logsoftmax_check(v, int(B), int(T), int(V), float(temp))))
    elif a.adam_check:
        print(json.dumps(adam_check(a.adam_check)))
    else:
        run_script(a, rest)


if __name__ == "__main__":
    main()
