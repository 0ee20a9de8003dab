"""Exactness tests for opd_agents/learner/supports.py: supports vs brute force, the chunked gatherer vs full logits."""
from __future__ import annotations

import pytest
import torch

from opd_agents.learner.losses import truncated_reverse_kl
from opd_agents.learner.supports import (
    gather_student_logprobs,
    in_support,
    student_topk_support,
    union_sampled_support,
)
from tests.learner.test_losses import D, _gen


def test_in_support_matches_brute_force_and_ignores_padding_slots():
    g = _gen(14)
    support = torch.randint(0, 6, (3, 4, 2), generator=g)
    sampled = torch.randint(0, 6, (3, 4), generator=g)
    slots = torch.rand(3, 4, 2, generator=g) > 0.3
    got, got_masked = in_support(support, sampled), in_support(support, sampled, slots)
    for i in range(3):
        for j in range(4):
            ids = support[i, j].tolist()
            assert got[i, j].item() == (sampled[i, j].item() in ids)
            kept = [v for v, keep in zip(ids, slots[i, j].tolist()) if keep]
            assert got_masked[i, j].item() == (sampled[i, j].item() in kept)


@pytest.mark.parametrize("chunk", [2, 3, 7, 100])
def test_chunked_gather_equals_naive_full_logits(chunk):
    g = _gen(10)
    T, H, V, K = 7, 5, 11, 3
    hidden = torch.randn(T, H, generator=g, dtype=D, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=D, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=D, requires_grad=True)
    ids = torch.randint(0, V, (T, K), generator=g)
    sampled = torch.randint(0, V, (T,), generator=g)
    out = gather_student_logprobs(hidden, weight, ids, bias=bias, sampled_ids=sampled, chunk=chunk)
    logp = torch.log_softmax(hidden @ weight.T + bias, -1)
    naive = (logp.gather(-1, ids), -(logp.exp() * logp).sum(-1), logp.gather(-1, sampled[:, None])[:, 0])
    weights = [torch.randn(x.shape, generator=g, dtype=D) for x in naive]
    got_grads = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, out)), (hidden, weight, bias))
    want_grads = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, naive)), (hidden, weight, bias))
    for got, want in zip(tuple(out) + got_grads, naive + want_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert gather_student_logprobs(hidden, weight, ids, chunk=chunk).sampled_logprob is None


def test_chunked_gather_upcasts_half_precision():
    g = _gen(11)
    hidden, weight = torch.randn(4, 6, generator=g).bfloat16(), torch.randn(9, 6, generator=g).bfloat16()
    out = gather_student_logprobs(hidden, weight, torch.zeros(4, 2, dtype=torch.long), chunk=3)
    assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32


def test_chunked_helpers_accept_an_empty_sequence():
    hidden, weight = torch.zeros(0, 4), torch.randn(9, 4)
    out = gather_student_logprobs(hidden, weight, torch.zeros(0, 2, dtype=torch.long),
                                  sampled_ids=torch.zeros(0).long())
    assert out.logprobs.shape == (0, 2) and out.entropy.shape == (0,) and out.sampled_logprob.shape == (0,)
    assert student_topk_support(hidden, weight, 3, 4).shape == (0, 3)


@pytest.mark.parametrize("chunk", [2, 5])
def test_student_topk_support_matches_naive(chunk):
    g = _gen(12)
    hidden, weight = torch.randn(5, 4, generator=g, dtype=D), torch.randn(13, 4, generator=g, dtype=D)
    ids = student_topk_support(hidden, weight, 3, chunk)
    assert torch.equal(ids, (hidden @ weight.T).topk(3, -1).indices)


def test_union_support_handles_duplicates():
    topk_ids = torch.tensor([[3, 1, 4], [3, 1, 4]])
    topk_lp = torch.tensor([[-0.5, -1.5, -2.0], [-0.5, -1.5, -2.0]], dtype=D)
    sampled = torch.tensor([1, 8])
    sampled_lp = torch.tensor([-1.5, -6.0], dtype=D)
    ids, teacher_lp, support_mask = union_sampled_support(topk_ids, topk_lp, sampled, sampled_lp)
    assert ids.tolist() == [[3, 1, 4, 1], [3, 1, 4, 8]]
    assert support_mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert teacher_lp[:, -1].tolist() == [-1.5, -6.0]
    student_full = torch.log_softmax(torch.randn(2, 10, generator=_gen(13), dtype=D), -1)
    loss, _ = truncated_reverse_kl(student_full.gather(-1, ids), teacher_lp, torch.ones(2), support_mask=support_mask)
    # Row 0 is exactly the teacher top-K (the duplicate adds no mass); row 1 has 4 distinct ids.
    row0, _ = truncated_reverse_kl(student_full[:1].gather(-1, topk_ids[:1]), topk_lp[:1], torch.ones(1))
    row1, _ = truncated_reverse_kl(student_full[1:].gather(-1, ids[1:]), teacher_lp[1:], torch.ones(1))
    assert loss.item() == pytest.approx((row0.item() + row1.item()) / 2, rel=1e-12)
