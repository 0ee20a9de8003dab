"""Distillation losses and their diagnostics (pure tensor code: no Ray / vLLM).

Owns: teacher top-K truncated reverse-KL, the full-vocabulary reverse-KL reference, sampled-token OPD (PPO-clipped),
loss aggregation, diagnostics and the discounted return-to-go estimator of the paper's toy study. The supports these
losses compare at (teacher top-K, student top-K, teacher top-K ∪ sampled token) and the chunked student log-prob
gatherer live in `opd_agents/learner/supports.py`; token masks (special-token masking, entropy top-ratio selection) in
`opd_agents/learner/masks.py`; the support-only student logits (LM head at the K support ids only, which
`truncated_reverse_kl(student_is_logits=True)` takes) in `opd_agents/learner/support_logits.py`.

Shapes: `(...)` is any leading shape of loss positions; for the `seq_*` aggregations, position buckets and
`discounted_returns` its LAST dim is the sequence (time) axis T. `K` is a support size, `V` the vocabulary, `H` the
hidden size. A `mask` is bool or 0/1 with shape `(...)`. Every loss returns `(loss, metrics)`: a scalar tensor and a
`dict[str, float]` of detached diagnostics. Inputs at masked-out positions are ignored entirely (they may hold
garbage, even -inf/NaN), so fully masked rows give zero loss and zero gradients. Half-precision inputs are upcast to
float32; float64 stays float64.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from opd_agents.learner.supports import in_support

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")

# Log-probs are floored here: e^-100 ≈ 4e-44 is below float32's smallest normal, so no representable fp32
# probability changes, while a -inf (teacher says "impossible") becomes a large but finite log-ratio.
LOGPROB_FLOOR = -100.0
# Fill for padding slots of a support: exp() of it is exactly 0, yet arithmetic on it stays finite (no 0·inf).
_NO_MASS = -1e9
# exp() overflow guard for the PPO ratio (as in verl): |log r| > 20 is far outside any useful clip range.
_MAX_LOG_RATIO = 20.0
POSITION_BUCKETS: tuple[int, ...] = (0, 64, 256, 1024)
# Per-turn metrics name turns 0 … MAX_TURN_KEYS − 1 one by one and pool the later ones ("@turn<MAX>+").
MAX_TURN_KEYS = 16


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """`x` where mask (broadcast from the left-aligned `mask`), else `fill`; gradients never reach masked slots."""
    m = mask.bool().reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, torch.full_like(x, fill))


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-position values `(...)` over `mask` `(...)` to a scalar.

    token_mean: Σ masked values / (`num_tokens` or the local masked count). Pass the GLOBAL masked-token count as
    `num_tokens` when accumulating gradients over micro-batches, so the summed micro-batch losses equal the loss of
    one big batch. seq_mean_token_mean / seq_mean_token_sum: per sequence (last dim) the token mean / token sum, then
    Σ over sequences / (`num_seqs` or the local count of sequences with ≥1 masked token; empty ones add 0).
    An empty mask gives 0.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    if aggregation == "token_mean" and num_seqs is not None:
        raise ValueError("num_seqs only applies to the seq_* aggregations; token_mean takes num_tokens")
    if aggregation != "token_mean" and num_tokens is not None:
        raise ValueError(f"num_tokens only applies to token_mean; {aggregation} takes num_seqs")
    m = mask.bool()
    v = _masked(values, m)
    if aggregation == "token_mean":
        return v.sum() / (m.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if m.dim() == 0:
        raise ValueError(f"{aggregation} needs a sequence dim: mask has shape ()")
    per_seq, count = v.sum(-1), m.sum(-1)
    if aggregation == "seq_mean_token_mean":
        per_seq = per_seq / count.clamp(min=1)
    return per_seq.sum() / ((count > 0).sum().clamp(min=1) if num_seqs is None else num_seqs)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` `(...)` over `mask` `(...)` (0 if empty)."""
    return aggregate(values, mask, "token_mean")


def _floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detach to python floats with a single device sync."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def _reverse_kl_terms(
    s: torch.Tensor, t: torch.Tensor, renormalize: bool, log_ratio_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot p_S·(log p_S − log p_T) for (masked, floored) log-probs `(..., K)`; also the clipped-slot flags."""
    if renormalize:
        s, t = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    log_ratio = s - t
    clipped = torch.zeros_like(log_ratio, dtype=torch.bool)
    if log_ratio_clip is not None:
        clipped = log_ratio.abs() > log_ratio_clip
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    return s.exp() * log_ratio, clipped


def truncated_reverse_kl(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    support_mask: torch.Tensor | None = None,
    renormalize: bool = True,
    log_ratio_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    student_is_logits: bool = False,
    student_vocab_logprobs: torch.Tensor | None = None,
    **diagnostics: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher top-K local support matching: reverse-KL restricted to a support of K token ids per position.

    student_logprobs, teacher_logprobs: `(..., K)` full-vocabulary log-probs of both models at the SAME ids.
    mask: `(...)` positions to train on. support_mask: `(..., K)` bool, False = padding slot (gets no mass).
    renormalize=True: log_softmax both inside the support, loss Σ_k p̂_S (log p̂_S − log p̂_T); False: the
    unnormalised truncated sum Σ_k p_S (log p_S − log p_T) (the paper's no-renormalisation ablation).
    log_ratio_clip=c clamps each (log p̂_S − log p̂_T) to [−c, c] (no gradient through a clamped ratio; p̂_S keeps its
    gradient). Only the student gets gradients. Log-probs are floored at LOGPROB_FLOOR, so -inf stays finite.
    student_is_logits=True (renormalize only): student_logprobs are the student's raw logits at the ids
    (`support_logits.support_logits`); the full-vocabulary log-sum-exp cancels inside the support, so loss
    and gradient equal those from full-vocabulary log-probs (except where such a log-prob is below LOGPROB_FLOOR: the
    floor zeroes that slot's gradient, the logits keep the exact one). student_support_mass then needs
    student_vocab_logprobs `(..., K)`, full-vocabulary log-probs at the ids, known where `student_mask` (a diagnostics
    keyword, see `sampled_token_diagnostics`) is set; without them that metric is left out.
    diagnostics: optional keywords forwarded to `sampled_token_diagnostics` (entropy, support_ids, sampled_ids,
    student_logprob, teacher_logprob, student_mask, turns), adding their metrics.
    Metrics: loss, kl_mean (local token mean), student/teacher_support_mass (+ student_support_mass_se, see
    `subsample_se`), num_tokens, log_ratio_clip_fraction; with a `turns` diagnostics keyword also kl_mean@turn<k> and
    teacher_support_mass@turn<k> with their num_tokens@turn<k> (see `turn_masks`).
    """
    if student_is_logits and not renormalize:
        raise ValueError("student_is_logits needs renormalize=True: without renormalisation the loss needs "
                         "full-vocabulary log-probs")
    s = _compute_dtype(student_logprobs)
    t = _compute_dtype(teacher_logprobs).detach().clamp(min=LOGPROB_FLOOR)
    slots = mask.bool().unsqueeze(-1).expand(s.shape)
    if support_mask is not None:
        slots = slots & support_mask.bool()
    vocab = student_vocab_logprobs if student_is_logits else s
    if student_is_logits:
        # Support-normalised log-probs: what the renormalised loss computes from full-vocabulary ones.
        s = torch.log_softmax(_masked(s, slots, _NO_MASS), dim=-1)
    s, t = _masked(s.clamp(min=LOGPROB_FLOOR), slots, _NO_MASS), _masked(t, slots, _NO_MASS)
    terms, clipped = _reverse_kl_terms(s, t, renormalize, log_ratio_clip)
    per_position = _masked(terms, slots).sum(-1)
    loss = aggregate(per_position, mask, aggregation, num_tokens, num_seqs)
    metrics = {
        "loss": loss,
        "kl_mean": masked_mean(per_position, mask),
        "teacher_support_mass": masked_mean(support_mass(t), mask),
        "num_tokens": mask.bool().sum(),
    }
    if vocab is not None:
        student_mask = diagnostics.get("student_mask")
        known = mask.bool() if student_mask is None else mask.bool() & student_mask.bool()
        vocab = _compute_dtype(vocab).detach().clamp(min=LOGPROB_FLOOR)
        mass = support_mass(vocab, slots)
        metrics["student_support_mass"] = masked_mean(mass, known)
        metrics["student_support_mass_se"] = subsample_se(mass, known, mask)
    if log_ratio_clip is not None:
        metrics["log_ratio_clip_fraction"] = (clipped & slots).sum() / slots.sum().clamp(min=1)
    turns = diagnostics.get("turns")
    if turns is not None:
        for tag, rows in turn_masks(mask, turns):
            metrics |= {f"kl_mean@{tag}": masked_mean(per_position, rows),
                        f"teacher_support_mass@{tag}": masked_mean(support_mass(t), rows),
                        f"num_tokens@{tag}": rows.sum()}
    return loss, _floats(metrics) | sampled_token_diagnostics(mask, support_mask=support_mask, **diagnostics)


def full_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    log_ratio_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    **diagnostics: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Full-vocabulary reverse-KL Σ_v p_S (log p_S − log p_T) from logits `(..., V)`; the reference objective.

    Exactly `truncated_reverse_kl(log_softmax(student), log_softmax(teacher), mask)` with K = V (renormalising a full
    distribution is the identity). Materialises `(..., V)`: for tests and small models only.
    """
    s = torch.log_softmax(_compute_dtype(student_logits), dim=-1)
    t = torch.log_softmax(_compute_dtype(teacher_logits), dim=-1)
    return truncated_reverse_kl(
        s, t, mask, log_ratio_clip=log_ratio_clip, aggregation=aggregation, num_tokens=num_tokens,
        num_seqs=num_seqs, **diagnostics,
    )


def sampled_token_opd(
    student_logprob: torch.Tensor,
    behaviour_logprob: torch.Tensor,
    teacher_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    adv_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    **diagnostics: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled-token OPD baseline: PPO clipped surrogate with advantage A = log p_T(y_t) − log p_behaviour(y_t).

    All inputs `(...)`: the current student's, the rollout policy's and the teacher's log-prob of the sampled token.
    A carries no gradient (optionally clamped to ±adv_clip); r = exp(student − behaviour); per-token loss
    −min(r·A, clip(r, 1−clip_eps, 1+clip_eps_high)·A), clip_eps_high defaulting to clip_eps. Teacher and behaviour
    log-probs are floored at LOGPROB_FLOOR; log r is clamped to ±20 against exp overflow.
    diagnostics: optional keywords for `sampled_token_diagnostics` (entropy, support_ids, sampled_ids, support_mask).
    Metrics: loss, clip_fraction (masked tokens whose clipped branch is active, i.e. zero gradient),
    advantage_mean/abs_mean, ratio_mean/min/max, num_tokens, and the teacher−student gap on sampled tokens.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.bool()
    b = _masked(_compute_dtype(behaviour_logprob).detach().clamp(min=LOGPROB_FLOOR), m)
    t = _masked(_compute_dtype(teacher_logprob).detach().clamp(min=LOGPROB_FLOOR), m)
    s = _masked(_compute_dtype(student_logprob), m)
    advantage = t - b
    if adv_clip is not None:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    ratio = (s - b).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    unclipped, clipped = ratio * advantage, ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate(per_token, m, aggregation, num_tokens, num_seqs)
    n = m.sum().clamp(min=1)
    ratio_seen = ratio.detach()[m] if m.any() else ratio.new_ones(1)
    metrics = {
        "loss": loss,
        "clip_fraction": (m & (clipped < unclipped)).sum() / n,
        "advantage_mean": masked_mean(advantage, m),
        "advantage_abs_mean": masked_mean(advantage.abs(), m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_min": ratio_seen.min(),
        "ratio_max": ratio_seen.max(),
        "num_tokens": m.sum(),
    }
    gaps = sampled_token_diagnostics(m, student_logprob=s, teacher_logprob=t, **diagnostics)
    return loss, _floats(metrics) | gaps


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
        ent = _compute_dtype(entropy).detach()
        metrics["entropy"] = masked_mean(ent, known)
        metrics["entropy_se"] = subsample_se(ent, known, mask)
    if support_ids is not None and sampled_ids is not None:
        outside = ~in_support(support_ids, sampled_ids, support_mask)
        metrics["sampled_not_in_support"] = masked_mean(outside.to(torch.float32), mask)
    if student_logprob is not None and teacher_logprob is not None:
        gap = (_compute_dtype(teacher_logprob) - _compute_dtype(student_logprob)).detach()
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
    return _floats(metrics)


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
    x = _masked(_compute_dtype(values).detach(), m)
    n, total = m.sum().to(x.dtype), population.bool().sum().to(x.dtype)
    mean = x.sum() / n.clamp(min=1)
    var = _masked((x - mean) ** 2, m).sum() / (n - 1).clamp(min=1)
    return ((1 - n / total.clamp(min=1)).clamp(min=0) * var / n.clamp(min=1)).sqrt()


def _gap_stats(gap: torch.Tensor, mask: torch.Tensor, suffix: str) -> dict[str, torch.Tensor]:
    mean = masked_mean(gap, mask)
    return {f"gap_mean{suffix}": mean, f"gap_std{suffix}": masked_mean((gap - mean) ** 2, mask).sqrt()}


def support_mass(logprobs: torch.Tensor, support_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(...)` probability mass exp(logsumexp) of full-vocabulary log-probs `(..., K)` inside the support."""
    if support_mask is not None:
        logprobs = _masked(logprobs, support_mask, _NO_MASS)
    return torch.logsumexp(logprobs.detach(), dim=-1).exp()


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return-to-go `(..., T)`: R_t = Σ_{t' ≥ t, masked} γ^{d(t, t')} r_{t'} at masked t, else 0.

    rewards `(..., T)` per-token (e.g. log p_T − log p_S), mask `(..., T)`. d counts masked tokens between t and t'
    (environment / prompt tokens between turns neither earn reward nor discount). γ=0: token-level, γ=1:
    sequence-level (causal). Solves R_t = r_t + γ^{m_t}·R_{t+1} by a parallel (Hillis–Steele) scan: log2(T)
    vectorised steps, only products of factors ≤ 1, so no γ^{-t} overflow for long sequences.
    """
    m = mask.bool()
    acc = torch.where(m, rewards, torch.zeros_like(rewards))
    factor = torch.ones_like(acc).masked_fill(m, gamma)
    span = 1
    while span < acc.shape[-1]:
        # Compose the step "R_t = acc_t + factor_t · R_{t+span}" with the one starting at t+span (zeros past T).
        acc = acc + factor * F.pad(acc[..., span:], (0, span))
        factor = factor * F.pad(factor[..., span:], (0, span))
        span *= 2
    return torch.where(m, acc, torch.zeros_like(acc))
