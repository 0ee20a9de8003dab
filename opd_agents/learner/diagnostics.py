"""Diagnostics of a distillation step: what the losses log beside their value (pure tensor code, no gradients).

Owns the sampled-token diagnostics (student entropy, whether the sampled token is in the support, the teacher−student
log-prob gap overall, per position bucket and per turn), the per-turn masks, the support mass, and the standard error
of a mean estimated on a random subsample of positions (the learner's diagnostics subsample on the support path).

Shapes: `(...)` is any leading shape of loss positions whose LAST dim is the sequence axis T (position buckets count
along it); `K` is a support size. A `mask` is bool or 0/1 with shape `(...)`.
"""
from __future__ import annotations

import torch

from opd_agents.learner.reductions import NO_MASS, compute_dtype, floats, masked, masked_mean
from opd_agents.learner.supports import in_support

POSITION_BUCKETS: tuple[int, ...] = (0, 64, 256, 1024)
# Per-turn metrics name turns 0 … MAX_TURN_KEYS − 1 one by one and pool the later ones ("@turn<MAX>+").
MAX_TURN_KEYS = 16


def sampled_token_diagnostics(
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    support_ids: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    support_mask: torch.Tensor | None = None,
    student_logprob: torch.Tensor | None = None,
    teacher_logprob: torch.Tensor | None = None,
    student_mask: torch.Tensor | None = None,
    turns: torch.Tensor | None = None,
) -> dict[str, float]:
    """Diagnostics on the sampled tokens, each computed only when its inputs are given.

    mask `(...)`; entropy `(...)` (student entropy → "entropy"); support_ids `(..., K)` + sampled_ids `(...)`
    (+ support_mask `(..., K)`) → "sampled_not_in_support"; student_logprob, teacher_logprob `(...)` of the sampled
    token → "gap_mean"/"gap_std" of log p_T − log p_S and the same per position bucket "gap_mean@a-b"/"gap_std@a-b".
    Buckets are 0-63, 64-255, 256-1023, 1024+ by the token's index among its sequence's masked tokens (last dim),
    i.e. the k-th student-generated token of the sample; empty buckets are omitted (no NaNs in logs).
    student_mask `(...)`, a subset of mask: the positions where entropy and student_logprob are known (the learner's
    diagnostics subsample on the support-logits path, a uniform random draw from mask); "entropy" and the gaps average
    over it, while the bucket index still counts every masked token. Default: mask. "entropy_se" and "gap_mean_se"
    are the standard errors of those means as estimates of the means over mask (`subsample_se`; 0 when exact).
    turns `(...)` long, the turn index of each position (-1 unknown): also "gap_mean@turn<k>" per turn
    (`turn_masks`). Every "<name>@<tag>" subset metric comes with "num_tokens@<tag>", the masked positions it stands
    for, so a caller combining micro-batches can weight it by its own tokens (`learner.accumulate_metrics`).
    """
    metrics: dict[str, torch.Tensor] = {}
    known = mask.bool() if student_mask is None else student_mask.bool() & mask.bool()
    if entropy is not None:
        ent = compute_dtype(entropy).detach()
        metrics["entropy"] = masked_mean(ent, known)
        metrics["entropy_se"] = subsample_se(ent, known, mask)
    if support_ids is not None and sampled_ids is not None:
        outside = ~in_support(support_ids, sampled_ids, support_mask)
        metrics["sampled_not_in_support"] = masked_mean(outside.to(torch.float32), mask)
    if student_logprob is not None and teacher_logprob is not None:
        gap = (compute_dtype(teacher_logprob) - compute_dtype(student_logprob)).detach()
        metrics |= _gap_stats(gap, known, "")
        metrics["gap_mean_se"] = subsample_se(gap, known, mask)
        index = mask.bool().long().cumsum(-1) - 1
        edges = POSITION_BUCKETS + (None,)
        for lo, hi in zip(edges[:-1], edges[1:]):
            rows = mask.bool() & (index >= lo) & (index < hi if hi is not None else True)
            bucket = known & rows
            if bucket.any():
                tag = f"@{lo}-{hi - 1}" if hi is not None else f"@{lo}+"
                metrics |= _gap_stats(gap, bucket, tag) | {f"num_tokens{tag}": rows.sum()}
        for tag, rows in turn_masks(mask, turns) if turns is not None else ():
            if (known & rows).any():
                metrics |= {f"gap_mean@{tag}": masked_mean(gap, known & rows), f"num_tokens@{tag}": rows.sum()}
    return floats(metrics)


def turn_masks(mask: torch.Tensor, turns: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """("turn<k>", mask & turns == k) `(...)` for each turn k present under `mask` (turns `(...)` long, -1 unknown),
    turns from MAX_TURN_KEYS on pooled as "turn<MAX_TURN_KEYS>+"; `turns`' empty turns are left out."""
    m = mask.bool() & (turns >= 0)
    capped = turns.clamp(max=MAX_TURN_KEYS)
    out = []
    for k in torch.unique(capped[m]).tolist():
        tag = f"turn{k}" if k < MAX_TURN_KEYS else f"turn{MAX_TURN_KEYS}+"
        out.append((tag, m & (capped == k)))
    return out


def subsample_se(values: torch.Tensor, sample: torch.Tensor, population: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean of `values` `(...)` over `sample` as an estimate of their mean over `population`
    (both masks `(...)`, sample ⊆ population, drawn uniformly without replacement: `support_logits.diagnostic_rows`).

    sqrt((1 − n/N) · s² / n) with n = |sample|, N = |population| and s² the sample variance (n − 1 denominator): the
    finite-population correction makes it exactly 0 when the sample is the whole population (an exact mean), so the
    full path reports 0. Empty masks give 0; a sample of one position out of several has no variance estimate and gives
    0 too (the config forbids a budget of 1).
    """
    m = sample.bool() & population.bool()
    x = masked(compute_dtype(values).detach(), m)
    n, total = m.sum().to(x.dtype), population.bool().sum().to(x.dtype)
    mean = x.sum() / n.clamp(min=1)
    var = masked((x - mean) ** 2, m).sum() / (n - 1).clamp(min=1)
    return ((1 - n / total.clamp(min=1)).clamp(min=0) * var / n.clamp(min=1)).sqrt()


def _gap_stats(gap: torch.Tensor, mask: torch.Tensor, suffix: str) -> dict[str, torch.Tensor]:
    mean = masked_mean(gap, mask)
    return {f"gap_mean{suffix}": mean, f"gap_std{suffix}": masked_mean((gap - mean) ** 2, mask).sqrt()}


def support_mass(logprobs: torch.Tensor, support_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(...)` probability mass exp(logsumexp) of full-vocabulary log-probs `(..., K)` inside the support."""
    if support_mask is not None:
        logprobs = masked(logprobs, support_mask, NO_MASS)
    return torch.logsumexp(logprobs.detach(), dim=-1).exp()
