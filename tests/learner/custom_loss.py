"""A loss registered from outside the framework's packages (named under `run.imports` in the registry test).

Forward KL Σ p̂_T (log p̂_T − log p̂_S) inside the teacher's top-K support, both renormalised there: exact on the
support logits alone, so it takes the support path; `loss.options.weight` scales it (the options channel).
"""
from __future__ import annotations

import torch

from opd_agents.config import LossConfig
from opd_agents.learner.loss_inputs import LossInputs
from opd_agents.learner.losses import aggregate
from opd_agents.learner.registry import register_loss


@register_loss("topk_forward_kl", teacher="topk", full_student_logits=False, support=True)
def topk_forward_kl(x: LossInputs, lc: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    slots = x.support_mask_BLK
    s, t = x.student_logits_BLK.float(), x.teacher_logprobs_BLK.float()
    if slots is not None:
        s, t = s.masked_fill(~slots, -1e9), t.masked_fill(~slots, -1e9)
    log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    loss = float(lc.options.get("weight", 1.0)) * aggregate(per_row, x.mask_BL, **x.aggregation(lc))
    return loss, {"forward_kl": float(aggregate(per_row.detach(), x.mask_BL))}
