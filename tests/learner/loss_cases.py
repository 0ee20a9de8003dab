"""Seeded tiny inputs for every registered loss on both learner paths, and the values a loss gives on them.

Shared by the `LossInputs` contract tests: `cases()` yields (name, LossConfig, MicroBatch, StudentRows, mask) the way
the learner builds them — the full path (full-vocabulary log-probs at the support, differentiable, every diagnostic
exact) and the support path (raw logits at the support, full-vocabulary diagnostics without gradient on a subsample
of rows). `evaluate(case, build)` runs the registered loss on `build(mb, rows, mask, num_tokens, num_seqs)` and
returns its loss, metrics and the gradient w.r.t. the student's full logits, as float64 numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from opd_agents.config import LossConfig
from opd_agents.learner.batching import MicroBatch
from opd_agents.learner.registry import get_loss
from opd_agents.learner.student import StudentRows

B, L, K, V = 2, 5, 4, 11

# (case name, loss config): every registered built-in loss, on each path its options select.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("topk_renorm_support", {"name": "topk_reverse_kl", "k": K}),
    ("topk_renorm_full", {"name": "topk_reverse_kl", "k": K, "student_logits": "full"}),
    ("topk_no_renorm", {"name": "topk_reverse_kl", "k": K, "renormalize": False}),
    ("topk_clip_seqmean", {"name": "topk_reverse_kl", "k": K, "log_ratio_clip": 0.5,
                           "aggregation": "seq_mean_token_sum"}),
    ("full_reverse_kl", {"name": "full_reverse_kl", "k": V}),
    ("sampled_recomputed", {"name": "sampled_token_opd", "k": K}),
    ("sampled_rollout", {"name": "sampled_token_opd", "k": K, "old_logprob": "rollout", "clip_ratio_c": None}),
]


def _inputs(k: int, seed: int) -> tuple[MicroBatch, torch.Tensor, torch.Tensor]:
    """A micro-batch (no model: ids and positions are placeholders), the student's full logits (B, L, V)
    (requires grad) and the loss mask (B, L): sample 1's last two rows are padding, row (0, 2) is masked."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64).float().requires_grad_(True)
    teacher = torch.log_softmax(2 * torch.randn(B, L, V, generator=g), -1)
    top = teacher.topk(k, dim=-1)
    support_mask = torch.ones(B, L, k, dtype=torch.bool)
    if k < V:
        support_mask[1, 0, -1] = False  # one padded support slot
    sampled = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    mask[0, 2] = False
    behaviour = torch.log_softmax(student.detach() / 0.9, -1).gather(-1, sampled[..., None])[..., 0] - 0.1
    mb = MicroBatch(input_ids=torch.zeros(B, L + 1, dtype=torch.long), attention_mask=torch.ones(B, L + 1),
                    positions=torch.arange(1, L + 1).expand(B, L), loss_mask=mask, support_ids=top.indices,
                    teacher_logprobs=top.values, support_mask=support_mask, sampled_ids=sampled, behaviour=behaviour,
                    teacher_sampled=teacher.gather(-1, sampled[..., None])[..., 0],
                    turns=torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, -1, -1]]),
                    old_logprobs=torch.log_softmax(student.detach(), -1).gather(-1, sampled[..., None])[..., 0])
    return mb, student, mask


def rows_of(mb: MicroBatch, student: torch.Tensor, support_path: bool) -> StudentRows:
    """`StudentRows` as `student.score_student` gives them on either path (support path: diagnostics on rows
    (0, 0), (0, 3) and (1, 1) only)."""
    logp = torch.log_softmax(student, -1)
    vocab = logp.gather(-1, mb.support_ids)
    entropy = -(logp.exp() * logp).sum(-1)
    sampled = logp.gather(-1, mb.sampled_ids[..., None])[..., 0]
    if not support_path:
        return StudentRows(vocab, False, vocab, entropy, sampled, None)
    known = torch.zeros(B, L, dtype=torch.bool)
    known[0, 0] = known[0, 3] = known[1, 1] = True
    zero = torch.zeros(())
    return StudentRows(student.gather(-1, mb.support_ids), True,
                       torch.where(known[..., None], vocab, zero).detach(),
                       torch.where(known, entropy, zero).detach(), torch.where(known, sampled, zero).detach(), known)


def cases() -> Iterator[tuple[str, LossConfig, MicroBatch, torch.Tensor, bool]]:
    for i, (name, options) in enumerate(CONFIGS):
        lc = LossConfig(**options)
        mb, student, _ = _inputs(lc.k, seed=100 + i)
        yield name, lc, mb, student, get_loss(lc.name).uses_support_logits(lc)


def evaluate(lc: LossConfig, mb: MicroBatch, student: torch.Tensor, support_path: bool,
             build: Callable[..., Any]) -> dict[str, Any]:
    """The registered loss on `build(mb, rows, mask, num_tokens, num_seqs)`: loss, metrics, d loss / d logits."""
    rows = rows_of(mb, student, support_path)
    mask = mb.loss_mask
    loss, metrics = get_loss(lc.name).fn(build(mb, rows, mask, float(mask.sum()), float(B)), lc)
    (grad,) = torch.autograd.grad(loss, student)
    return {"loss": float(loss.detach()), "metrics": {k: float(v) for k, v in sorted(metrics.items())},
            "grad": [float(v) for v in grad.flatten()]}
