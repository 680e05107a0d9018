"""Tensor helpers: the padding-safe forward, log-probs, entropy and masked statistics.

Shapes: B rows, L = P + T tokens, T response tokens, V vocabulary.
"""

import math

import torch

INVALID_LOGPROB = 1.0  # written on padded response slots; every sum over them is masked anyway


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, or a ValueError that names the two quantities when b does not divide a."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row of bools (B, T), or T where a row has none. (B,)"""
    T = bools.shape[-1]
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, T).min(dim=-1).values


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... counted over real tokens only, so left padding does not shift positions. (B, L)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """model(...) with position ids built from the attention mask (B, L); the same call at rollout
    and at training time, so the two passes agree token for token."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )


def response_logits(model, query_responses: torch.Tensor, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """The logits that predict each of the last T tokens (the response): position t's logits predict
    token t + 1, so they are those of positions P-1 .. P+T-2. (B, P+T) -> (B, T, V)"""
    return forward(model, query_responses, attention_mask, logits_to_keep=T + 1).logits[:, :-1]


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / t)[labels] that keeps nothing for backward but the logits themselves:
    the softmax is recomputed row by row there, so no (B, T, V) copy is saved beside the logits."""

    @staticmethod
    def forward(ctx, logits, labels, temperature):
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for i, (row_logits, row_labels) in enumerate(zip(logits, labels)):
            row_logits = row_logits.float() / temperature  # (T, V): one row at a time
            out[i] = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row_logits, dim=-1)
        ctx.save_for_backward(logits, labels)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """d/dz_v of log p_y = (1[v = y] - p_v) / t, row by row."""
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i, (row_logits, row_labels) in enumerate(zip(logits, labels)):
            g = -torch.softmax(row_logits.float() / ctx.temperature, dim=-1) * grad_out[i].unsqueeze(-1)  # (T, V)
            g.scatter_add_(-1, row_labels.unsqueeze(-1), grad_out[i].unsqueeze(-1))
            grad[i] = g / ctx.temperature
        return grad, None, None


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[labels] for logits (B, T, V), labels (B, T) -> (B, T), fp32.
    Row by row, so at most one (T, V) temporary lives beside the logits, in forward and backward."""
    return _SelectiveLogSoftmax.apply(logits, labels, temperature)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position, row by row. (B, T, V) -> (B, T)"""
    out = []
    for row_logits in logits:
        log_p = torch.log_softmax(row_logits.float() / temperature, dim=-1)  # (T, V)
        p_log_p = torch.where(log_p > -torch.inf, log_p.exp() * log_p, 0.0)  # a -inf logit has p = 0: 0, not 0 * -inf
        out.append(-p_log_p.sum(-1))
    return torch.stack(out)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of values where mask is True (padding may hold anything, even inf)."""
    values = torch.where(mask, values, torch.zeros_like(values))
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of values where mask is True, over all elements or along dim."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce=None) -> torch.Tensor:
    """(values - mean) / std over the masked elements, unbiased variance. all_reduce(t) sums a
    tensor over processes (e.g. accelerator.reduce) so the statistics are those of the global batch.
    With fewer than two valid elements the variance is undefined, so values are only centred."""
    total = (lambda t: t) if all_reduce is None else all_reduce
    n = total(mask.sum().to(values.dtype))
    mean = total(masked_sum(values, mask)) / n.clamp(min=1)
    var = total(masked_sum((values - mean) ** 2, mask)) / (n - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8) if n >= 2 else values - mean
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def global_means(accelerator, tensors: dict) -> dict:
    """{name: mean over all processes} of tensors whose sizes may differ between processes (token
    counts do): every process's sums and counts in one gather, in float64."""
    device = accelerator.device
    local = torch.stack(
        [
            torch.stack([t.double().sum(), torch.tensor(t.numel(), dtype=torch.float64, device=device)])
            for t in tensors.values()
        ]
    )  # (names, 2)
    total = accelerator.gather(local.unsqueeze(0)).sum(0)  # (names, 2)
    return {name: (s / n).item() for name, (s, n) in zip(tensors, total)}


def global_var(accelerator, x: torch.Tensor) -> float:
    """Variance over all processes (population variance, float64)."""
    mean = global_means(accelerator, {"x": x})["x"]
    return global_means(accelerator, {"x": (x.double() - mean) ** 2})["x"]


def lr_scheduler(name: str, optimizer, warmup_updates: int, num_updates: int):
    """The learning rate as a factor of the initial one, stepped once per update: linear warm-up
    over warmup_updates, then "linear" decay to 0, "cosine" decay to 0, or "constant" (the same
    curves as transformers' get_scheduler, with warm-up also for "constant")."""

    def factor(step: int) -> float:
        if step < warmup_updates:
            return step / max(1, warmup_updates)
        progress = (step - warmup_updates) / max(1, num_updates - warmup_updates)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
