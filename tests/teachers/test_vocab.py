"""Start-up vocabulary comparison: error / mask / map, and remapping teacher top-K ids into student id space."""
from __future__ import annotations

import pytest
import torch

from opd_agents.samples import Sample, TeacherTopK
from teachers.vocab import UNMAPPED_ID, VocabMismatchError, check_vocab, remap_topk, translate_sample

STUDENT = {"a": 0, "b": 1, "c": 2, "<|im_end|>": 3, "d": 4}
# Same strings for a/b/c; <|im_end|> moved; d missing; <think> extra.
TEACHER = {"a": 0, "b": 1, "c": 2, "<think>": 3, "<|im_end|>": 4, "e": 5}


def test_identical_vocab_is_ok(tiny_tokenizer):
    report = check_vocab(tiny_tokenizer.get_vocab(), tiny_tokenizer.get_vocab())
    assert report.identical and not report.masked_student_ids


def test_error_names_tokens_and_the_fix():
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(STUDENT, TEACHER, "error", teacher_name="math_teacher")
    msg = str(err.value)
    assert "'<|im_end|>' (student id 3, teacher id 4)" in msg and "'d'" in msg
    assert "teachers.math_teacher.vocab_mismatch: mask" in msg and "map" in msg


def test_mask_keeps_only_ids_with_the_same_string():
    report = check_vocab(STUDENT, TEACHER, "mask")
    assert report.masked_student_ids == {3, 4}
    assert report.student_to_teacher == {0: 0, 1: 1, 2: 2}
    assert report.teacher_to_student.tolist() == [0, 1, 2, UNMAPPED_ID, UNMAPPED_ID, UNMAPPED_ID]


def test_map_translates_by_token_string():
    report = check_vocab(STUDENT, TEACHER, "map")
    assert report.student_to_teacher == {0: 0, 1: 1, 2: 2, 3: 4}
    assert report.masked_student_ids == {4}
    assert report.teacher_to_student.tolist() == [0, 1, 2, UNMAPPED_ID, 3, UNMAPPED_ID]
    sample = Sample(input_ids=[0, 1, 3, 4], loss_mask=[0, 1, 1, 1], behaviour_logprobs=[0.0] * 4, task="t")
    assert translate_sample(sample, report).input_ids == [0, 1, 4, 0]


def test_remap_topk_drops_teacher_ids_without_student_counterpart():
    report = check_vocab(STUDENT, TEACHER, "map")
    topk = TeacherTopK(
        topk_ids=torch.tensor([[3, 4, 0], [5, 2, 7]]),  # 7: padded lm_head row beyond the tokenizer
        topk_logprobs=torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.2, -3.0]]),
        sampled_logprobs=torch.tensor([-1.0, -0.2]))
    out = remap_topk(topk, report)
    assert out.topk_ids.tolist() == [[3, 0, UNMAPPED_ID], [2, UNMAPPED_ID, UNMAPPED_ID]]
    assert out.topk_logprobs[0, :2].tolist() == [-1.0, -2.0] and out.topk_logprobs[1, 0].item() == pytest.approx(-0.2)
    assert torch.isinf(out.topk_logprobs[out.topk_ids < 0]).all()
    assert torch.equal(out.sampled_logprobs, topk.sampled_logprobs)


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="error"):
        check_vocab(STUDENT, TEACHER, "ignore")  # type: ignore[arg-type]
