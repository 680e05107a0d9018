"""Two micro-checks that need no script, each run in a fresh process by bench/algorithms.py:

    python bench/micro_checks.py --logsoftmax VARIANT B T V TEMPERATURE   # VARIANT: ours or naive
    python bench/micro_checks.py --adam PARAMS_MILLIONS

Each prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


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


def logsoftmax_check(variant: str, B: int, T: int, V: int, temperature: float) -> dict:
    """Forward + backward of the label log-probs of (B, T, V) fp32 logits that come out of a linear
    layer (as an LM head's do): what is kept for backward besides the logits, and the RSS peak above
    the state before the call."""
    import torch

    from common.ops import selective_log_softmax

    torch.manual_seed(0)
    head = torch.nn.Linear(64, V, bias=False)
    hidden, labels = torch.randn(B, T, 64), torch.randint(0, V, (B, T))
    logits = head(hidden)  # (B, T, V), non-leaf: the linear keeps hidden and weight, not the logits
    fn = {
        "ours": lambda x: selective_log_softmax(x, labels, temperature),
        "naive": lambda x: torch.log_softmax(x / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1),
    }[variant]
    base, seen, extra = logits.untyped_storage().data_ptr(), set(), [0]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() != base and s.data_ptr() not in seen and t.numel() > B * T:
            seen.add(s.data_ptr())
            extra[0] += s.nbytes()
        return t

    before = rss_mib()
    reset_peak_rss()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logprobs = fn(logits)
    logprobs.sum().backward()
    elapsed = time.perf_counter() - start
    return {
        "variant": variant, "B": B, "T": T, "V": V, "temperature": temperature,
        "logits_mib": logits.numel() * 4 / 2**20, "extra_saved_for_backward_mib": extra[0] / 2**20,
        "rss_peak_above_start_mib": vm_hwm_mib() - before, "seconds": elapsed,
    }  # fmt: skip


def adam_check(millions: float) -> dict:
    """Seconds per AdamW step over `millions` M fp32 parameters: the per-tensor loop (torch's default
    on CPU), foreach=True and fused=True (what the scripts use)."""
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
        start = time.perf_counter()
        for _ in range(3):
            opt.step()
        out[f"{name}_s"] = (time.perf_counter() - start) / 3
        del params, opt
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logsoftmax", nargs=5, metavar=("VARIANT", "B", "T", "V", "TEMPERATURE"))
    p.add_argument("--adam", type=float, metavar="PARAMS_MILLIONS")
    a = p.parse_args()
    if a.logsoftmax:
        v, B, T, V, temp = a.logsoftmax
        print(json.dumps(logsoftmax_check(v, int(B), int(T), int(V), float(temp))))
    elif a.adam:
        print(json.dumps(adam_check(a.adam)))
    else:
        p.error("give --logsoftmax or --adam")
