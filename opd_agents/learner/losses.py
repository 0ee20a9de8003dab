"""Distillation losses (pure tensor code: no Ray / vLLM).

Owns: teacher top-K truncated reverse-KL, the full-vocabulary reverse-KL reference, sampled-token OPD (PPO-clipped)
and loss aggregation. What they log beside the loss (entropy, gaps, support mass, per-turn metrics) is
`opd_agents/learner/diagnostics.py`; the masked helpers both use, `reductions.py`. The supports these
losses compare at (teacher top-K, student top-K, teacher top-K ∪ sampled token) and the chunked student log-prob
gatherer live in `opd_agents/learner/supports.py`; token masks (special-token masking, entropy top-ratio selection) in
`opd_agents/learner/masks.py`; the support-only student logits (LM head at the K support ids only, which
`truncated_reverse_kl(student_is_logits=True)` takes) in `opd_agents/learner/support_logits.py`.

Shapes: `(...)` is any leading shape of loss positions; for the `seq_*` aggregations its LAST dim is the sequence
(time) axis T. `K` is a support size, `V` the vocabulary, `H` the
hidden size. A `mask` is bool or 0/1 with shape `(...)`. Every loss returns `(loss, metrics)`: a scalar tensor and a
`dict[str, float]` of detached diagnostics. Inputs at masked-out positions are ignored entirely (they may hold
garbage, even -inf/NaN), so fully masked rows give zero loss and zero gradients. Half-precision inputs are upcast to
float32; float64 stays float64.
"""
from __future__ import annotations

from typing import Literal

import torch

from opd_agents.learner.diagnostics import sampled_token_diagnostics, subsample_se, support_mass, turn_masks
from opd_agents.learner.reductions import LOGPROB_FLOOR, NO_MASS, compute_dtype, floats, masked, masked_mean

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")

# exp() overflow guard for the PPO ratio (as in verl): |log r| > 20 is far outside any useful clip range.
_MAX_LOG_RATIO = 20.0


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
    v = masked(values, m)
    if aggregation == "token_mean":
        return v.sum() / (m.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if m.dim() == 0:
        raise ValueError(f"{aggregation} needs a sequence dim: mask has shape ()")
    per_seq, count = v.sum(-1), m.sum(-1)
    if aggregation == "seq_mean_token_mean":
        per_seq = per_seq / count.clamp(min=1)
    return per_seq.sum() / ((count > 0).sum().clamp(min=1) if num_seqs is None else num_seqs)


def _weighted(values: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """values `(...)` times constant weights `(...)` at the mask (masked slots keep whatever they hold: `aggregate`
    ignores them)."""
    if weights is None:
        return values
    return values * masked(compute_dtype(weights).detach().to(values.dtype), mask, 1.0)


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
    weights: torch.Tensor | None = None,
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
    weights: `(...)` constant per-position factors of the loss (off-policy importance weights, `off_policy.py`); the
    normaliser stays the masked-token count and `kl_mean` stays unweighted. None = 1.
    diagnostics: optional keywords forwarded to `sampled_token_diagnostics` (entropy, support_ids, sampled_ids,
    student_logprob, teacher_logprob, student_mask, turns), adding their metrics.
    Metrics: loss, kl_mean (local token mean), student/teacher_support_mass (+ student_support_mass_se, see
    `subsample_se`), num_tokens, log_ratio_clip_fraction; with a `turns` diagnostics keyword also kl_mean@turn<k> and
    teacher_support_mass@turn<k> with their num_tokens@turn<k> (see `turn_masks`).
    """
    if student_is_logits and not renormalize:
        raise ValueError("student_is_logits needs renormalize=True: without renormalisation the loss needs "
                         "full-vocabulary log-probs")
    s = compute_dtype(student_logprobs)
    t = compute_dtype(teacher_logprobs).detach().clamp(min=LOGPROB_FLOOR)
    slots = mask.bool().unsqueeze(-1).expand(s.shape)
    if support_mask is not None:
        slots = slots & support_mask.bool()
    vocab = student_vocab_logprobs if student_is_logits else s
    if student_is_logits:
        # Support-normalised log-probs: what the renormalised loss computes from full-vocabulary ones.
        s = torch.log_softmax(masked(s, slots, NO_MASS), dim=-1)
    s, t = masked(s.clamp(min=LOGPROB_FLOOR), slots, NO_MASS), masked(t, slots, NO_MASS)
    terms, clipped = _reverse_kl_terms(s, t, renormalize, log_ratio_clip)
    per_position = masked(terms, slots).sum(-1)
    loss = aggregate(_weighted(per_position, weights, mask), mask, aggregation, num_tokens, num_seqs)
    metrics = {
        "loss": loss,
        "kl_mean": masked_mean(per_position, mask),
        "teacher_support_mass": masked_mean(support_mass(t), mask),
        "num_tokens": mask.bool().sum(),
    }
    if vocab is not None:
        student_mask = diagnostics.get("student_mask")
        known = mask.bool() if student_mask is None else mask.bool() & student_mask.bool()
        vocab = compute_dtype(vocab).detach().clamp(min=LOGPROB_FLOOR)
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
    return loss, floats(metrics) | sampled_token_diagnostics(mask, support_mask=support_mask, **diagnostics)


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
    s = torch.log_softmax(compute_dtype(student_logits), dim=-1)
    t = torch.log_softmax(compute_dtype(teacher_logits), dim=-1)
    return truncated_reverse_kl(
        s, t, mask, log_ratio_clip=log_ratio_clip, aggregation=aggregation, num_tokens=num_tokens,
        num_seqs=num_seqs, **diagnostics,
    )


def sampled_token_opd(
    student_logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    teacher_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    clip_ratio_c: float | None = None,
    adv_clip: float | None = None,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    **diagnostics: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled-token OPD baseline: PPO clipped surrogate with advantage A = log p_T(y_t) − log p_old(y_t).

    All inputs `(...)`: the current student's, the old policy's and the teacher's log-prob of the sampled token. The
    paper's code takes p_old = the student's full-vocabulary distribution recomputed before the update (then A is a
    one-sample estimate of the reverse KL's per-token term and r = 1 on the first update); the rollout's top-p
    processed log-prob is the other choice (`loss.old_logprob`). A carries no gradient (optionally clamped to
    ±adv_clip); r = exp(student − old); per-token loss ℓ = max(−r·A, −clip(r, 1−clip_eps, 1+clip_eps_high)·A),
    clip_eps_high defaulting to clip_eps; with clip_ratio_c = c (dual-clip PPO, verl's `clip_ratio_c`, > 1) a token
    with A < 0 has min(ℓ, −c·A), which bounds its loss when r grows past c. Teacher and old log-probs are floored at
    LOGPROB_FLOOR; log r is clamped to ±20 against exp overflow. weights: `(...)` constant per-token factors (off-policy
    importance weights, `off_policy.py`) as in `truncated_reverse_kl`.
    diagnostics: optional keywords for `sampled_token_diagnostics` (entropy, support_ids, sampled_ids, support_mask).
    Metrics: loss, clip_fraction (masked tokens whose clipped branch is active, i.e. zero gradient),
    clip_fraction_lower (with clip_ratio_c: tokens with A < 0 whose dual clip is active), advantage_mean/abs_mean,
    ratio_mean/min/max, num_tokens, and the teacher−student gap on sampled tokens.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c = {clip_ratio_c} must be > 1 (dual-clip PPO's lower bound of the ratio)")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.bool()
    b = masked(compute_dtype(old_logprob).detach().clamp(min=LOGPROB_FLOOR), m)
    t = masked(compute_dtype(teacher_logprob).detach().clamp(min=LOGPROB_FLOOR), m)
    s = masked(compute_dtype(student_logprob), m)
    advantage = t - b
    if adv_clip is not None:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    ratio = (s - b).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    unclipped, clipped = ratio * advantage, ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    n = m.sum().clamp(min=1)
    extra: dict[str, torch.Tensor] = {}
    if clip_ratio_c is not None:
        bound = -advantage * clip_ratio_c
        negative = advantage < 0
        extra["clip_fraction_lower"] = (m & negative & (per_token > bound)).sum() / n
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
    loss = aggregate(_weighted(per_token, weights, m), m, aggregation, num_tokens, num_seqs)
    ratio_seen = ratio.detach()[m] if m.any() else ratio.new_ones(1)
    metrics = {
        "loss": loss,
        "clip_fraction": (m & (clipped < unclipped)).sum() / n,
        **extra,
        "advantage_mean": masked_mean(advantage, m),
        "advantage_abs_mean": masked_mean(advantage.abs(), m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_min": ratio_seen.min(),
        "ratio_max": ratio_seen.max(),
        "num_tokens": m.sum(),
    }
    gaps = sampled_token_diagnostics(m, student_logprob=s, teacher_logprob=t, **diagnostics)
    return loss, floats(metrics) | gaps
