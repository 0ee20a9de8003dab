"""The loss registry: every distillation loss registered by name with a spec of what it needs.

A loss is one decorated function `fn(x: LossInputs, lc: LossConfig) -> (loss, metrics)` (verl's
`register_policy_loss` style). Its `LossSpec` tells the framework what to fetch, so the trainer, learner and preflight
never branch on loss names:
  - `teacher`: which teacher query feeds it — "topk" (the teacher's top-K at every loss position, `loss.k`),
    "score" (the teacher's log-probs at ids the student chose: its own top-K) or "full" (K = the vocabulary);
  - `full_student_logits`: whether it needs the student's full-vocabulary normaliser (all V logits per row) or is
    exact on the K support logits alone (`loss.student_logits: auto` then takes the cheaper support path);
  - `support`: whether `loss.support` shapes its support (teacher top-K | student top-K | teacher top-K ∪ sampled);
  - `old_logprobs`: whether it reads `batch.old_logprobs`, the student's log-prob of each sampled token recomputed
    by one no-grad pass before the update's first optimizer step (PPO's old policy, as verl computes it);
  - `importance`: which off-policy importance weight its term at a position takes when `loss.off_policy_correction`
    is on (`off_policy.py`): "prefix" (the history's likelihood ratio: a term that does not depend on the token
    sampled there, as the top-K loss over the teacher's top-K) or "inclusive" (also that token's own ratio: a term
    that depends on it, as sampled-token OPD's with a recomputed old policy, or top-K over a support holding it).
`teacher`, `full_student_logits`, `old_logprobs` and `importance` may be functions of the `LossConfig` (e.g.
`renormalize: false` needs the normaliser).
Users register their own loss in a module listed under `run.imports` and name it as `loss.name`; its
hyper-parameters go under `loss.options`.

The built-in losses below are thin adapters from `LossInputs` (`loss_inputs.py`: the fields, their shapes and which
path gives which) to the pure tensor functions of `losses.py`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from opd_agents.config import LossConfig
from opd_agents.learner import losses
from opd_agents.learner.loss_inputs import LossInputs

TeacherQuery = Literal["topk", "score", "full"]
Importance = Literal["prefix", "inclusive"]
TEACHER_QUERIES: tuple[str, ...] = ("topk", "score", "full")


LossFn = Callable[[LossInputs, LossConfig], tuple[torch.Tensor, dict[str, float]]]
_PerConfig = bool | Callable[[LossConfig], bool]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs (see the module docstring)."""

    name: str
    fn: LossFn
    teacher: TeacherQuery | Callable[[LossConfig], TeacherQuery]
    full_student_logits: _PerConfig
    support: bool
    old_logprobs: _PerConfig = False
    importance: Importance | Callable[[LossConfig], Importance] = "prefix"

    def teacher_query(self, lc: LossConfig) -> TeacherQuery:
        query = self.teacher(lc) if callable(self.teacher) else self.teacher
        if query not in TEACHER_QUERIES:
            raise ValueError(f"loss {self.name!r} asks for teacher query {query!r}; valid: {list(TEACHER_QUERIES)}")
        return query

    def needs_full_logits(self, lc: LossConfig) -> bool:
        return bool(self.full_student_logits(lc) if callable(self.full_student_logits) else self.full_student_logits)

    def uses_support_logits(self, lc: LossConfig) -> bool:
        """The learner's path for `lc`: support-only student logits (True) or full-vocabulary chunks (False)."""
        return lc.student_logits == "support" or (lc.student_logits == "auto" and not self.needs_full_logits(lc))

    def needs_old_logprobs(self, lc: LossConfig) -> bool:
        return bool(self.old_logprobs(lc) if callable(self.old_logprobs) else self.old_logprobs)

    def importance_weight(self, lc: LossConfig) -> Importance:
        kind = self.importance(lc) if callable(self.importance) else self.importance
        if kind not in ("prefix", "inclusive"):
            raise ValueError(f"loss {self.name!r}: importance {kind!r} is not 'prefix' or 'inclusive'")
        return kind

    def union_sampled(self, lc: LossConfig) -> bool:
        return self.support and lc.support == "teacher_topk_union_sampled"


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, teacher: TeacherQuery | Callable[[LossConfig], TeacherQuery] = "topk",
                  full_student_logits: _PerConfig = True, support: bool = False,
                  old_logprobs: _PerConfig = False,
                  importance: Importance | Callable[[LossConfig], Importance] = "prefix",
                  ) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(x: LossInputs, lc: LossConfig) -> (loss, metrics)` available as `loss.name: <name>`.

    Defaults are the safe ones: the teacher's top-K and the full-vocabulary student logits."""

    def wrap(fn: LossFn) -> LossFn:
        if name in _LOSSES and _LOSSES[name].fn is not fn:
            raise ValueError(f"loss {name!r} is already registered by {_LOSSES[name].fn.__qualname__}")
        if not callable(importance) and importance not in ("prefix", "inclusive"):
            raise ValueError(f"loss {name!r}: importance={importance!r} is not 'prefix' or 'inclusive'")
        _LOSSES[name] = LossSpec(name, fn, teacher, full_student_logits, support, old_logprobs, importance)
        return fn

    return wrap


def registered_losses() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str) -> LossSpec:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered losses: {registered_losses()} (a loss of your own: "
                       "decorate it with opd_agents.learner.registry.register_loss in a module listed under "
                       "run.imports)")
    return _LOSSES[name]


@register_loss("topk_reverse_kl", teacher=lambda lc: "score" if lc.support == "student_topk" else "topk",
               full_student_logits=lambda lc: not lc.renormalize, support=True,
               importance=lambda lc: "inclusive" if lc.support == "teacher_topk_union_sampled" else "prefix")
def topk_reverse_kl(x: LossInputs, lc: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's teacher top-K local support matching: reverse-KL inside the support, renormalised (default)."""
    return _reverse_kl(x, lc, lc.renormalize)


@register_loss("full_reverse_kl", teacher="full", full_student_logits=True)
def full_reverse_kl(x: LossInputs, lc: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The full-vocabulary reverse-KL reference: the teacher answers with K = V, and renormalising a full
    distribution is the identity."""
    return _reverse_kl(x, lc, True)


def _reverse_kl(x: LossInputs, lc: LossConfig, renormalize: bool) -> tuple[torch.Tensor, dict[str, float]]:
    student = x.student_logits_BLK if x.on_support_path else x.student_logprobs_BLK
    return losses.truncated_reverse_kl(
        student, x.teacher_logprobs_BLK, x.mask_BL, support_mask=x.support_mask_BLK, renormalize=renormalize,
        log_ratio_clip=lc.log_ratio_clip, student_is_logits=x.on_support_path,
        student_vocab_logprobs=x.diag_vocab_logprobs_BLK, student_logprob=x.diag_sampled_logprobs_BL,
        teacher_logprob=x.teacher_sampled_logprobs_BL, weights=x.importance_weights_BL, **x.aggregation(lc),
        **x.diagnostics())


@register_loss("sampled_token_opd", teacher="topk", full_student_logits=True,
               old_logprobs=lambda lc: lc.old_logprob == "recomputed",
               # With the rollout's log-prob as the old policy the PPO ratio already reweighs the sampled token.
               importance=lambda lc: "inclusive" if lc.old_logprob == "recomputed" else "prefix")
def sampled_token_opd(x: LossInputs, lc: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The sampled-token OPD baseline (PPO-clipped, advantage log p_T − log p_old of the sampled token, p_old as
    `loss.old_logprob` says); the teacher's top-K feeds only its diagnostics."""
    old = x.rollout_logprobs_BL if lc.old_logprob == "rollout" else x.old_logprobs_BL
    if old is None:
        raise ValueError("loss.old_logprob = 'recomputed' but this micro-batch carries no recomputed old log-probs "
                         "(the learner computes them before the update when the loss spec asks for old_logprobs)")
    return losses.sampled_token_opd(x.student_sampled_logprobs_BL, old, x.teacher_sampled_logprobs_BL, x.mask_BL,
                                    clip_eps=lc.clip_eps, clip_eps_high=lc.clip_eps_high,
                                    clip_ratio_c=lc.clip_ratio_c, adv_clip=lc.adv_clip,
                                    weights=x.importance_weights_BL, support_mask=x.support_mask_BLK,
                                    **x.aggregation(lc), **x.diagnostics())
