"""`LossInputs`: one micro-batch as a registered loss sees it — the loss author's whole contract.

Shapes: B samples, L loss rows (a sample's loss positions, padded), K support slots (the support ids of each row).
Every field means one thing, named with its shape: the student's side comes either as full-vocabulary log-probs
(`student_logprobs_BLK`) or as raw logits (`student_logits_BLK`), never one field holding either. Which one a loss
gets is its registration's choice (`register_loss(full_student_logits=...)`): True — the learner computes all V
logits per row and the loss gets log-probs; False — the learner computes only the K support rows of the LM head and
the loss gets raw logits, exact for anything renormalised inside the support (`log_softmax` over the K logits equals
renormalising full-vocabulary log-probs there) and much cheaper at V ≈ 152k. Reading the side a loss was not given
raises `LossInputsError` naming the registration that would give it.

Gradient flows through `student_logprobs_BLK` / `student_logits_BLK` and `student_sampled_logprobs_BL` only; every
teacher, rollout and `diag_*` tensor is constant. The `diag_*` fields are the student's full-vocabulary values for
diagnostics (entropy, support mass, the sampled-token gap): exact at every row on the full path, on the support path
known only at the rows of `diag_mask_BL` (a seeded subsample of `loss.diagnostic_positions` rows; 0 elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opd_agents.config import LossConfig
from opd_agents.learner.batching import MicroBatch
from opd_agents.learner.student import StudentRows


class LossInputsError(ValueError):
    """A loss read a field this micro-batch does not carry (see the module docstring)."""


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch for a loss `fn(x: LossInputs, lc: LossConfig) -> (loss, metrics)`.

    support_ids_BLK: long, the token ids of each row's support (the teacher's top-K, the student's top-K, ...).
    support_mask_BLK: bool, False = a padded slot that gets no mass; None = every slot is real.
    teacher_logprobs_BLK: the teacher's full-vocabulary log-probs at support_ids_BLK.
    mask_BL: bool, the rows this loss trains on (padding, masked special tokens and an entropy selection removed).
    sampled_ids_BL: long, the token the student sampled at each row.
    teacher_sampled_logprobs_BL: the teacher's log-prob of the sampled token.
    rollout_logprobs_BL: the rollout's log-prob of the sampled token under its processed (temperature, top-p)
        distribution.
    old_logprobs_BL: the student's full-vocabulary log-prob of the sampled token before this update (one no-grad
        pass; PPO's old policy), or None unless the loss registered `old_logprobs`.
    importance_weights_BL: constant off-policy importance weights of the rows (`off_policy.py`, the kind the loss
        registered: `importance`), None unless `loss.off_policy_correction` is on; pass them as the loss's weights.
    num_tokens / num_seqs: the mini-batch's global normalisers (`aggregation`).
    diag_*: see the module docstring; turns_BL: long turn index of each row (-1 unknown), or None.
    Read `student_logprobs_BLK` or `student_logits_BLK` (by registration) and `student_sampled_logprobs_BL`.
    """

    support_ids_BLK: torch.Tensor
    support_mask_BLK: torch.Tensor | None
    teacher_logprobs_BLK: torch.Tensor
    mask_BL: torch.Tensor
    sampled_ids_BL: torch.Tensor
    teacher_sampled_logprobs_BL: torch.Tensor
    rollout_logprobs_BL: torch.Tensor
    old_logprobs_BL: torch.Tensor | None
    importance_weights_BL: torch.Tensor | None
    num_tokens: float
    num_seqs: float
    diag_vocab_logprobs_BLK: torch.Tensor | None
    diag_sampled_logprobs_BL: torch.Tensor | None
    diag_entropy_BL: torch.Tensor | None
    diag_mask_BL: torch.Tensor | None
    turns_BL: torch.Tensor | None
    _student_BLK: torch.Tensor
    _student_is_logits: bool
    _student_sampled_BL: torch.Tensor | None

    @classmethod
    def from_rows(cls, mb: MicroBatch, rows: StudentRows, mask_BL: torch.Tensor, num_tokens: float,
                  num_seqs: float) -> LossInputs:
        """The learner's micro-batch and the student's rows (`student.score_student`) as a loss's inputs."""
        full = not rows.is_logits
        return cls(
            support_ids_BLK=mb.support_ids, support_mask_BLK=mb.support_mask, teacher_logprobs_BLK=mb.teacher_logprobs,
            mask_BL=mask_BL, sampled_ids_BL=mb.sampled_ids, teacher_sampled_logprobs_BL=mb.teacher_sampled,
            rollout_logprobs_BL=mb.behaviour, old_logprobs_BL=mb.old_logprobs,
            importance_weights_BL=mb.importance_weights, num_tokens=num_tokens,
            num_seqs=num_seqs, diag_vocab_logprobs_BLK=_detached(rows.vocab_logprobs),
            diag_sampled_logprobs_BL=_detached(rows.sampled_logprob), diag_entropy_BL=_detached(rows.entropy),
            diag_mask_BL=rows.vocab_mask, turns_BL=mb.turns, _student_BLK=rows.support,
            _student_is_logits=rows.is_logits, _student_sampled_BL=rows.sampled_logprob if full else None)

    @property
    def student_logprobs_BLK(self) -> torch.Tensor:
        """(B, L, K) the student's full-vocabulary log-probs at support_ids_BLK, differentiable."""
        if self._student_is_logits:
            raise LossInputsError("this loss runs on the support path and gets the student's raw logits at the "
                                  "support (student_logits_BLK), not full-vocabulary log-probs; register it with "
                                  "full_student_logits=True to get student_logprobs_BLK")
        return self._student_BLK

    @property
    def student_logits_BLK(self) -> torch.Tensor:
        """(B, L, K) the student's raw logits at support_ids_BLK, differentiable (support path)."""
        if not self._student_is_logits:
            raise LossInputsError("this loss runs on the full-vocabulary path and gets log-probs "
                                  "(student_logprobs_BLK); register it with full_student_logits=False (exact only "
                                  "for losses renormalised inside the support) to get student_logits_BLK")
        return self._student_BLK

    @property
    def student_sampled_logprobs_BL(self) -> torch.Tensor:
        """(B, L) the student's full-vocabulary log-prob of the sampled token, differentiable (full path only)."""
        if self._student_sampled_BL is None:
            raise LossInputsError("the student's differentiable log-prob of the sampled token needs the "
                                  "full-vocabulary path: register the loss with full_student_logits=True "
                                  "(diag_sampled_logprobs_BL holds it without gradient on diagnostic rows)")
        return self._student_sampled_BL

    @property
    def on_support_path(self) -> bool:
        """Whether the student's side is raw support logits (else full-vocabulary log-probs)."""
        return self._student_is_logits

    def aggregation(self, lc: LossConfig) -> dict[str, Any]:
        """Keyword arguments of `losses.aggregate` (and the losses taking it) for `lc.aggregation`."""
        agg: dict[str, Any] = {"aggregation": lc.aggregation}
        if lc.aggregation == "token_mean":
            return agg | {"num_tokens": self.num_tokens}
        return agg | {"num_seqs": self.num_seqs}

    def diagnostics(self) -> dict[str, Any]:
        """Keyword arguments of `diagnostics.sampled_token_diagnostics` that the micro-batch provides."""
        diag: dict[str, Any] = dict(support_ids=self.support_ids_BLK, sampled_ids=self.sampled_ids_BL)
        if self.turns_BL is not None:
            diag["turns"] = self.turns_BL
        if self.diag_entropy_BL is not None:
            diag |= dict(entropy=self.diag_entropy_BL, student_mask=self.diag_mask_BL)
        return diag


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()
