"""Support sets of the distillation losses: which token ids each position compares the student and teacher at.

Owns support construction from the teacher's candidates (teacher top-K ∪ sampled token; the teacher top-K itself is
the teacher's answer as it comes), the student's
own top-K ids, membership tests, and the chunked student log-prob gatherer that evaluates the full-vocabulary LM head
at those ids without a `(T, V)` buffer. The losses that take these supports live in `opd_agents/learner/losses.py`; the
support-only student logits (LM head at the K ids only) in `opd_agents/learner/support_logits.py`.

Shapes: `(...)` is any leading shape of positions, `K` a support size, `T` positions (rows) of final hidden states,
`V` the vocabulary, `H` the hidden size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd_agents.sampling import SamplingParams, processed_logprobs


def in_support(
    support_ids: torch.Tensor, sampled_ids: torch.Tensor, support_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`(...)` bool: whether sampled_ids `(...)` is among the (unpadded) slots of support_ids `(..., K)`."""
    hit = support_ids == sampled_ids.unsqueeze(-1)
    if support_mask is not None:
        hit = hit & support_mask.bool()
    return hit.any(-1)


def union_sampled_support(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_teacher_logprob: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-K ∪ {sampled token}: (ids, teacher log-probs, support_mask), each `(..., K + 1)`.

    topk_ids, topk_logprobs `(..., K)`; sampled_ids, sampled_teacher_logprob `(...)`. The last slot holds the sampled
    token; its support_mask is False when the token is already in the top-K, so no id is counted twice.
    """
    ids = torch.cat([topk_ids, sampled_ids.unsqueeze(-1)], dim=-1)
    logprobs = torch.cat([topk_logprobs, sampled_teacher_logprob.unsqueeze(-1).to(topk_logprobs.dtype)], dim=-1)
    fresh = ~in_support(topk_ids, sampled_ids)
    support_mask = torch.cat([torch.ones_like(topk_ids, dtype=torch.bool), fresh.unsqueeze(-1)], dim=-1)
    return ids, logprobs, support_mask


class StudentLogprobs(NamedTuple):
    """Output of `gather_student_logprobs`; row i is the next-token distribution computed from hidden[i]."""

    logprobs: torch.Tensor  # (T, K) full-vocabulary log-probs at the requested ids
    entropy: torch.Tensor  # (T,) entropy of the full next-token distribution
    sampled_logprob: torch.Tensor | None  # (T,) log-prob of sampled_ids, None when not asked for


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight, bias)
    # Under the learner's autocast the LM head runs in the compute dtype; what follows stays float32 (an einsum would
    # otherwise autocast down too).
    with torch.autocast(hidden.device.type, enabled=False):
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        del logits  # no backward needs it: free its (rows, V) buffer before the entropy's
        # The einsum sums p·log p without materialising their (rows, V) product.
        entropy = -torch.einsum("tv,tv->t", logp.exp(), logp)
        return logp.gather(-1, ids), entropy, logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)


def gather_student_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    chunk: int = 1024,
) -> StudentLogprobs:
    """Student log-probs at `ids` `(T, K)` from final hidden states `(T, H)`, lm_head weight `(V, H)`, bias `(V,)`.

    Works `chunk` rows at a time and recomputes each chunk in backward (activation checkpointing), so at most one
    `(chunk, V)` fp32 block is alive, forward or backward, instead of `(T, V)`. Differentiable w.r.t. hidden, weight and
    bias. Also returns the per-row entropy `(T,)` and, if sampled_ids `(T,)` is given, its log-prob `(T,)`.
    Aligning rows with target positions (logits at t−1 score token t) is the caller's job.
    """
    sampled = ids[:, 0] if sampled_ids is None else sampled_ids
    parts = [
        checkpoint(_chunk_logprobs, hidden[i : i + chunk], weight, bias, ids[i : i + chunk], sampled[i : i + chunk],
                   use_reentrant=False)
        for i in _chunk_starts(hidden, chunk)
    ]
    logprobs, entropy, sampled_lp = (torch.cat(p) for p in zip(*parts))
    return StudentLogprobs(logprobs, entropy, sampled_lp if sampled_ids is not None else None)


def _chunk_starts(hidden: torch.Tensor, chunk: int) -> range:
    """Row offsets of the chunks; an empty `hidden` still gets one (empty) chunk so outputs keep their shapes."""
    return range(0, max(hidden.shape[0], 1), chunk)


@torch.no_grad()
def processed_sampled_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, sampled_ids: torch.Tensor, params: SamplingParams, *,
    bias: torch.Tensor | None = None, chunk: int = 1024,
) -> torch.Tensor:
    """`(T,)` float32: the log-prob of sampled_ids `(T,)` under the rollout's processed sampling distribution
    (temperature, top-k, top-p, renormalised: `sampling.processed_logprobs`, the arithmetic the rollout's sampler
    uses) from hidden `(T, H)`, lm_head `(V, H)`, chunk-wise; -inf where the token is outside the kept set. No grad."""
    parts = []
    for i in _chunk_starts(hidden, chunk):
        logits = F.linear(hidden[i : i + chunk], weight, bias).float()
        if not logits.shape[0]:
            parts.append(logits.new_zeros(0))
            continue
        parts.append(processed_logprobs(logits, params).gather(-1, sampled_ids[i : i + chunk, None]).squeeze(-1))
    return torch.cat(parts)


@torch.no_grad()
def student_topk_support(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk: int = 1024, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Student top-k token ids `(T, k)` (most likely first) from hidden `(T, H)`, lm_head `(V, H)`, chunk-wise.

    The teacher's log-probs at these ids are then needed for the loss (a teacher that scores given ids).
    """
    rows = [F.linear(hidden[i : i + chunk], weight, bias).topk(k, dim=-1).indices for i in _chunk_starts(hidden, chunk)]
    return torch.cat(rows)
