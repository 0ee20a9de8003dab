"""Student/teacher vocabulary comparison at start-up, and the id translation it implies.

The loss compares student and teacher distributions id by id, so the ids must mean the same token strings.
`check_vocab` compares the two `token string -> id` maps under the teacher's `vocab_mismatch` policy:
  - "error" (default): any difference raises `VocabMismatchError` naming a few differing tokens and the fixes;
  - "mask": ids that mean the same string in both are used as they are; every other student id is masked (loss
    positions whose student token is in `VocabReport.masked_student_ids` are dropped);
  - "map": student ids are translated to teacher ids by token string; student ids whose string the teacher lacks
    are masked as above.
Rows whose student token is masked come back with `TeacherTopK.scored` False (`mark_unscored`).
How the teacher's answer comes back into student id space ("mask" and "map"): `remap_topk` translates each top-K
teacher id through `VocabReport.teacher_to_student`; a teacher id without a student counterpart is dropped from the
support — its slot gets id `UNMAPPED_ID` (-1) and log-prob -inf, and slots are re-sorted so the unmapped ones come
last. The loss must exclude slots with `topk_ids < 0` (e.g. gather at `ids.clamp(min=0)` and mask). Log-probs
keep their full-vocabulary normalisation. Shapes: topk_ids/topk_logprobs (N, K), sampled_logprobs (N,).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from opd_agents.samples import Sample, TeacherTopK

UNMAPPED_ID = -1
# The teacher sees this id where a student token has no teacher counterpart; that position is masked for the loss.
PLACEHOLDER_TEACHER_ID = 0

Policy = Literal["error", "mask", "map"]


class VocabMismatchError(ValueError):
    """Student and teacher vocabularies differ and the configured policy is `error`."""


@dataclass
class VocabReport:
    """Outcome of the start-up check; `identical` reports need no translation at all.

    student_to_teacher: student id -> teacher id for every usable student id (empty when identical).
    teacher_to_student: (V_teacher,) int64 table, UNMAPPED_ID where a teacher id has no student counterpart.
    masked_student_ids: student ids whose loss positions the learner must drop.
    differing: token strings that are missing or carry another id on either side (sorted).
    """

    policy: Policy
    identical: bool
    differing: list[str] = field(default_factory=list)
    masked_student_ids: frozenset[int] = frozenset()
    student_to_teacher: dict[int, int] = field(default_factory=dict)
    teacher_to_student: torch.Tensor | None = None


def check_vocab(student_vocab: dict[str, int], teacher_vocab: dict[str, int], policy: Policy = "error",
                teacher_name: str = "<name>") -> VocabReport:
    """Compare vocabularies; raise under "error", else return what the learner masks and how ids translate."""
    if policy not in ("error", "mask", "map"):
        raise ValueError(f"vocab_mismatch policy {policy!r} is not one of ['error', 'mask', 'map']")
    if student_vocab == teacher_vocab:
        return VocabReport(policy, identical=True)
    differing = sorted({t for t, i in student_vocab.items() if teacher_vocab.get(t) != i}
                       | {t for t, i in teacher_vocab.items() if student_vocab.get(t) != i})
    if policy == "error":
        shown = ", ".join(_describe(t, student_vocab, teacher_vocab) for t in differing[:5])
        raise VocabMismatchError(
            f"student and teacher {teacher_name!r} vocabularies differ in {len(differing)} tokens, e.g. {shown}. "
            f"Ids would be compared across different tokens. Fix: use a teacher with the student's tokenizer, or set "
            f"`teachers.{teacher_name}.vocab_mismatch: mask` (drop differing tokens) or `map` (translate ids by "
            "token string), and/or list the differing special tokens under loss.special_tokens")
    if policy == "mask":
        s2t = {i: i for t, i in student_vocab.items() if teacher_vocab.get(t) == i}
    else:
        s2t = {i: teacher_vocab[t] for t, i in student_vocab.items() if t in teacher_vocab}
    table = torch.full((max(teacher_vocab.values(), default=-1) + 1,), UNMAPPED_ID, dtype=torch.long)
    for s, t in s2t.items():
        table[t] = s
    masked = frozenset(i for i in student_vocab.values() if i not in s2t)
    return VocabReport(policy, False, differing, masked, s2t, table)


def _describe(token: str, student: dict[str, int], teacher: dict[str, int]) -> str:
    return f"{token!r} (student id {student.get(token, 'missing')}, teacher id {teacher.get(token, 'missing')})"


def translate_sample(sample: Sample, report: VocabReport) -> Sample:
    """The sample with input_ids in teacher id space (unmatched student ids become PLACEHOLDER_TEACHER_ID)."""
    if report.identical:
        return sample
    ids = [report.student_to_teacher.get(i, PLACEHOLDER_TEACHER_ID) for i in sample.input_ids]
    return replace(sample, input_ids=ids)


def remap_topk(topk: TeacherTopK, report: VocabReport) -> TeacherTopK:
    """Teacher top-K ids -> student ids; unmapped slots become (UNMAPPED_ID, -inf) and sort last."""
    if report.identical or report.teacher_to_student is None:
        return topk
    table = report.teacher_to_student
    in_range = topk.topk_ids < table.numel()
    ids = torch.where(in_range, table[topk.topk_ids.clamp(max=table.numel() - 1)], UNMAPPED_ID)
    vals = topk.topk_logprobs.masked_fill(ids < 0, float("-inf"))
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    return TeacherTopK(ids.gather(-1, order), vals, topk.sampled_logprobs, topk.scored)


def mark_unscored(topk: TeacherTopK, sample: Sample, report: VocabReport) -> TeacherTopK:
    """`topk` with `scored` False at the loss rows whose (student) token is in `report.masked_student_ids`."""
    if report.identical or not report.masked_student_ids:
        return topk
    tokens = torch.tensor([sample.input_ids[t] for t in sample.loss_positions()], dtype=torch.long)
    scored = ~torch.isin(tokens, torch.tensor(sorted(report.masked_student_ids), dtype=torch.long))
    if topk.scored is not None:
        scored &= topk.scored
    return replace(topk, scored=scored)
