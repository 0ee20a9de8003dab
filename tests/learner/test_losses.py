"""Exactness tests for opd_agents/learner/losses.py: brute-force loops on tiny tensors, gradchecks, edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from opd_agents.learner.diagnostics import sampled_token_diagnostics, support_mass
from opd_agents.learner.losses import (
    aggregate,
    full_reverse_kl,
    sampled_token_opd,
    truncated_reverse_kl,
)
from opd_agents.learner.reductions import LOGPROB_FLOOR

D = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vocab_logprobs(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.log_softmax(torch.randn(shape, generator=g, dtype=D) * 2, dim=-1)


def _support(B: int, T: int, V: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Full-vocab student/teacher log-probs (B, T, V), K distinct support ids per position, their gathered values."""
    s_full, t_full = _vocab_logprobs((B, T, V), g), _vocab_logprobs((B, T, V), g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    return s_full, t_full, ids, s_full.gather(-1, ids), t_full.gather(-1, ids)


def _brute_truncated_kl(s, t, mask, support_mask, renormalize, clip=None):
    """Token-mean truncated reverse-KL with explicit python loops over positions and slots."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            slots = [k for k in range(s.shape[2]) if support_mask[b, i, k]]
            ls = {k: s[b, i, k].item() for k in slots}
            lt = {k: t[b, i, k].item() for k in slots}
            if renormalize:
                zs = math.log(sum(math.exp(v) for v in ls.values()))
                zt = math.log(sum(math.exp(v) for v in lt.values()))
                ls = {k: v - zs for k, v in ls.items()}
                lt = {k: v - zt for k, v in lt.items()}
            for k in slots:
                ratio = ls[k] - lt[k]
                if clip is not None:
                    ratio = max(-clip, min(clip, ratio))
                total += math.exp(ls[k]) * ratio
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_truncated_kl_matches_brute_force(renormalize, clip):
    g = _gen(1)
    _, _, _, s, t = _support(2, 5, 12, 4, g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    support_mask = torch.rand(2, 5, 4, generator=g) > 0.25
    support_mask[..., 0] = True
    loss, metrics = truncated_reverse_kl(
        s, t, mask, support_mask=support_mask, renormalize=renormalize, log_ratio_clip=clip
    )
    expected = _brute_truncated_kl(s, t, mask, support_mask, renormalize, clip)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["num_tokens"] == mask.sum().item()


def test_support_mass_metrics_are_teacher_and_student_mass_inside_support():
    g = _gen(2)
    _, _, _, s, t = _support(1, 3, 10, 3, g)
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, metrics = truncated_reverse_kl(s, t, mask)
    assert metrics["student_support_mass"] == pytest.approx(s.exp().sum(-1).mean().item(), rel=1e-12)
    assert metrics["teacher_support_mass"] == pytest.approx(t.exp().sum(-1).mean().item(), rel=1e-12)
    pad = torch.tensor([True, True, False]).expand(1, 3, 3)
    assert torch.allclose(support_mass(s, pad), s[..., :2].exp().sum(-1))


def test_one_token_renormalised_support_gives_zero_loss_and_gradient():
    # A renormalised 1-token support is a point mass for both models (the paper's K = 1 ablation is inert).
    s = _vocab_logprobs((2, 3, 5), _gen(20))[..., :1].requires_grad_()  # full-vocabulary log-probs of one token
    loss, _ = truncated_reverse_kl(s, _vocab_logprobs((2, 3, 5), _gen(21))[..., :1], torch.ones(2, 3))
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_full_kl_equals_truncated_with_k_equal_v():
    g = _gen(3)
    s_logits, t_logits = torch.randn(2, 4, 9, generator=g, dtype=D), torch.randn(2, 4, 9, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    s, t = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    full, _ = full_reverse_kl(s_logits, t_logits, mask)
    truncated, _ = truncated_reverse_kl(s, t, mask)
    assert torch.equal(full, truncated)
    unnormalised, _ = truncated_reverse_kl(s, t, mask, renormalize=False)
    assert torch.allclose(full, unnormalised, rtol=1e-12, atol=1e-14)
    reference = (s.exp() * (s - t)).sum(-1)[mask.bool()].mean()
    assert torch.allclose(full, reference, rtol=1e-12)


@pytest.mark.parametrize("renormalize", [True, False])
def test_truncated_kl_gradcheck(renormalize):
    g = _gen(4)
    _, _, _, s, t = _support(2, 3, 8, 4, g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    support_mask = torch.ones(2, 3, 4, dtype=torch.bool)
    support_mask[1, 2, 3] = False
    s = s.clone().requires_grad_(True)

    def f(x):
        return truncated_reverse_kl(x, t, mask, support_mask=support_mask, renormalize=renormalize)[0]

    assert torch.autograd.gradcheck(f, (s,))


def test_teacher_gets_no_gradient():
    g = _gen(5)
    _, _, _, s, t = _support(1, 4, 8, 3, g)
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    truncated_reverse_kl(s, t, torch.ones(1, 4))[0].backward()
    assert t.grad is None and s.grad is not None
    sl, bl, tl = (torch.randn(3, generator=g, dtype=D, requires_grad=True) for _ in range(3))
    sampled_token_opd(sl, bl, tl, torch.ones(3))[0].backward()
    assert tl.grad is None and bl.grad is None and sl.grad is not None


def test_fully_masked_rows_give_zero_loss_and_zero_gradients():
    garbage = torch.tensor([[[float("nan"), -math.inf], [0.0, -math.inf]]], dtype=D)
    s = garbage.clone().requires_grad_(True)
    mask = torch.zeros(1, 2)
    for renormalize in (True, False):
        loss, metrics = truncated_reverse_kl(s, garbage, mask, renormalize=renormalize)
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
        assert all(math.isfinite(v) for v in metrics.values())
    sl = torch.tensor([-math.inf, float("nan")], dtype=D, requires_grad=True)
    loss, metrics = sampled_token_opd(sl, torch.tensor([0.0, -math.inf], dtype=D), garbage[0, 0], torch.zeros(2))
    (grad,) = torch.autograd.grad(loss, sl)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("renormalize", [True, False])
def test_minus_inf_teacher_logprob_inside_support_stays_finite(renormalize):
    s = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=D), -1).requires_grad_(True)
    t = torch.tensor([[-0.1, -2.5, -math.inf, -math.inf]], dtype=D)
    loss, _ = truncated_reverse_kl(s, t, torch.ones(1), renormalize=renormalize)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    floored = t.clamp(min=LOGPROB_FLOOR)
    expected = _brute_truncated_kl(s.detach()[None], floored[None], torch.ones(1, 1), torch.ones(1, 1, 4), renormalize)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def _brute_opd(s, b, t, mask, eps_low, eps_high, adv_clip=None):
    total, count, clipped = 0.0, 0, 0
    for i in range(len(s)):
        if not mask[i]:
            continue
        a = t[i] - b[i]
        if adv_clip is not None:
            a = max(-adv_clip, min(adv_clip, a))
        r = math.exp(s[i] - b[i])
        plain, clip = r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a
        total += -min(plain, clip)
        clipped += clip < plain
        count += 1
    return total / count, clipped / count


@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("adv_clip", [None, 0.7])
def test_sampled_token_opd_matches_brute_force(eps_high, adv_clip):
    g = _gen(6)
    s, b, t = (torch.randn(20, generator=g, dtype=D) * 0.4 - 1 for _ in range(3))
    mask = torch.rand(20, generator=g) > 0.2
    loss, metrics = sampled_token_opd(s, b, t, mask, clip_eps=0.2, clip_eps_high=eps_high, adv_clip=adv_clip)
    expected, clip_frac = _brute_opd(s.tolist(), b.tolist(), t.tolist(), mask, 0.2, eps_high or 0.2, adv_clip)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(clip_frac)
    assert 0 < clip_frac < 1
    assert metrics["advantage_mean"] == pytest.approx((t - b)[mask].clamp(-(adv_clip or 9),
                                                                          adv_clip or 9).mean().item())


def test_sampled_token_opd_gradcheck():
    g = _gen(7)
    # Ratios kept clear of the clip boundaries (where the surrogate has a kink) but on both sides of them.
    b = torch.randn(6, generator=g, dtype=D)
    log_r = torch.tensor([-0.5, -0.05, 0.05, 0.5, 0.1, -0.4], dtype=D)
    t = b + torch.tensor([1.0, -1.0, 0.5, -0.5, -2.0, 2.0], dtype=D)
    s = (b + log_r).requires_grad_(True)
    mask = torch.tensor([1, 1, 1, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda x: sampled_token_opd(x, b, t, mask)[0], (s,))


def _brute_dual_clip(s, b, t, mask, eps, c):
    """Dual-clip PPO (Ye et al. 2019) as an objective to maximise: J = min(r·A, clip(r)·A), and for A < 0
    J = max(J, c·A); the loss is −J. Also the share of masked tokens where c·A wins."""
    total, count, lower = 0.0, 0, 0
    for i in range(len(s)):
        if not mask[i]:
            continue
        a, r = t[i] - b[i], math.exp(s[i] - b[i])
        objective = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        if a < 0 and c * a > objective:
            objective, lower = c * a, lower + 1
        total, count = total - objective, count + 1
    return total / count, lower / count


def test_sampled_token_opd_dual_clip_matches_brute_force():
    g = _gen(16)
    b = torch.randn(40, generator=g, dtype=D) * 0.3 - 1
    s = b + torch.randn(40, generator=g, dtype=D) * 1.5  # ratios far above c = 3 on some tokens
    t = b + torch.randn(40, generator=g, dtype=D)
    mask = torch.rand(40, generator=g) > 0.2
    loss, metrics = sampled_token_opd(s, b, t, mask, clip_eps=0.2, clip_ratio_c=3.0)
    expected, lower = _brute_dual_clip(s.tolist(), b.tolist(), t.tolist(), mask, 0.2, 3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_fraction_lower"] == pytest.approx(lower) and 0 < lower < 1
    plain, plain_metrics = sampled_token_opd(s, b, t, mask, clip_eps=0.2)  # without the dual clip: larger losses
    assert plain.item() > loss.item() and "clip_fraction_lower" not in plain_metrics


def test_dual_clip_bounds_a_negative_advantage_and_cuts_its_gradient():
    b, t = torch.zeros(2, dtype=D), torch.tensor([-1.0, 1.0], dtype=D)  # A = −1, +1
    s = torch.tensor([math.log(5.0), math.log(5.0)], dtype=D, requires_grad=True)  # r = 5 > c on both
    loss, _ = sampled_token_opd(s, b, t, torch.ones(2, dtype=torch.bool), clip_eps=0.2, clip_ratio_c=3.0,
                                aggregation="token_mean", num_tokens=1.0)
    loss.backward()
    # A < 0: min(max(5, 0.8·... ) ·1, 3·1) = 3 and no gradient; A > 0: r clipped at 1.2, loss −1.2, no gradient.
    assert loss.item() == pytest.approx(3.0 - 1.2) and s.grad.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="clip_ratio_c"):
        sampled_token_opd(s, b, t, torch.ones(2), clip_ratio_c=1.0)


def test_sampled_token_opd_dual_clip_gradcheck():
    g = _gen(17)
    b = torch.randn(6, generator=g, dtype=D)
    log_r = torch.tensor([-0.5, 0.05, 1.5, 0.5, 0.1, 2.0], dtype=D)  # r = 4.5 and 7.4 past c = 3, away from kinks
    t = b + torch.tensor([1.0, -1.0, -0.5, -0.5, -2.0, 2.0], dtype=D)
    s = (b + log_r).requires_grad_(True)
    mask = torch.tensor([1, 1, 1, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda x: sampled_token_opd(x, b, t, mask, clip_ratio_c=3.0)[0], (s,))


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.2 - 1e-6, 1.0, False),  # just inside 1+ε, A > 0: gradient flows
        (1.2 + 1e-6, 1.0, True),  # just outside 1+ε, A > 0: clipped
        (1.2 + 1e-6, -1.0, False),  # above 1+ε with A < 0: min picks the unclipped term
        (0.8 + 1e-6, -1.0, False),  # just inside 1−ε, A < 0
        (0.8 - 1e-6, -1.0, True),  # just outside 1−ε, A < 0: clipped
        (0.8 - 1e-6, 1.0, False),  # below 1−ε with A > 0: unclipped
    ],
)
def test_clip_boundaries(ratio, advantage, clipped):
    b = torch.tensor([-1.0], dtype=D)
    s = (b + math.log(ratio)).requires_grad_(True)
    loss, metrics = sampled_token_opd(s, b, b + advantage, torch.ones(1), clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, s)
    assert metrics["clip_fraction"] == float(clipped)
    if clipped:
        assert grad.item() == 0.0
        assert loss.item() == pytest.approx(-(1.2 if advantage > 0 else 0.8) * advantage)
    else:
        assert grad.item() == pytest.approx(-ratio * advantage)
        assert loss.item() == pytest.approx(-ratio * advantage)


def test_asymmetric_clip_high():
    b = torch.zeros(1, dtype=D)
    s = torch.full((1,), math.log(1.25), dtype=D)
    _, low_only = sampled_token_opd(s, b, b + 1, torch.ones(1), clip_eps=0.2)
    _, with_high = sampled_token_opd(s, b, b + 1, torch.ones(1), clip_eps=0.2, clip_eps_high=0.28)
    assert low_only["clip_fraction"] == 1.0 and with_high["clip_fraction"] == 0.0


def _brute_aggregate(values, mask, how):
    seqs = [[v for v, m in zip(vr, mr) if m] for vr, mr in zip(values.tolist(), mask.tolist())]
    if how == "token_mean":
        flat = [v for seq in seqs for v in seq]
        return sum(flat) / max(len(flat), 1)
    per = [sum(seq) / (len(seq) if how == "seq_mean_token_mean" else 1) for seq in seqs if seq]
    return sum(per) / max(len(per), 1)


@pytest.mark.parametrize("how", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregations_match_brute_force(how):
    g = _gen(8)
    values = torch.randn(4, 6, generator=g, dtype=D)
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[2] = False  # an empty sequence is not counted
    assert aggregate(values, mask, how).item() == pytest.approx(_brute_aggregate(values, mask, how), rel=1e-12)


def test_aggregate_rejects_bad_arguments():
    values, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        aggregate(values, mask, "sum")
    with pytest.raises(ValueError, match="num_seqs"):
        aggregate(values, mask, "seq_mean_token_sum", num_tokens=3)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(values, mask, "token_mean", num_seqs=3)


@pytest.mark.parametrize("how, norm", [("token_mean", "num_tokens"), ("seq_mean_token_mean", "num_seqs")])
def test_micro_batches_with_global_normaliser_equal_one_batch(how, norm):
    g = _gen(9)
    _, _, _, s, t = _support(4, 5, 10, 3, g)
    mask = torch.rand(4, 5, generator=g) > 0.3
    s = s.clone().requires_grad_(True)
    big, _ = truncated_reverse_kl(s, t, mask, aggregation=how)
    (big_grad,) = torch.autograd.grad(big, s)
    total = mask.sum() if norm == "num_tokens" else (mask.sum(-1) > 0).sum()
    parts = [truncated_reverse_kl(s[i : i + 2], t[i : i + 2], mask[i : i + 2], aggregation=how, **{norm: total})[0]
             for i in (0, 2)]
    (acc_grad,) = torch.autograd.grad(sum(parts), s)
    assert torch.allclose(sum(parts), big, rtol=1e-12) and torch.allclose(acc_grad, big_grad, rtol=1e-10)
    b, sl, tl = (torch.randn(4, 5, generator=g, dtype=D) for _ in range(3))
    big_opd, _ = sampled_token_opd(sl, b, tl, mask, aggregation=how)
    parts_opd = [sampled_token_opd(sl[i : i + 2], b[i : i + 2], tl[i : i + 2], mask[i : i + 2], aggregation=how,
                                   **{norm: total})[0] for i in (0, 2)]
    assert torch.allclose(sum(parts_opd), big_opd, rtol=1e-12)


def test_sampled_not_in_support_metric_matches_brute_force():
    g = _gen(14)
    support = torch.randint(0, 6, (3, 4, 2), generator=g)
    sampled = torch.randint(0, 6, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    outside = [sampled[i, j].item() not in support[i, j].tolist() for i in range(3) for j in range(4) if mask[i, j]]
    _, metrics = truncated_reverse_kl(torch.zeros(3, 4, 2), torch.zeros(3, 4, 2), mask, support_ids=support,
                                      sampled_ids=sampled, entropy=torch.ones(3, 4))
    assert metrics["sampled_not_in_support"] == pytest.approx(sum(outside) / len(outside))
    assert metrics["entropy"] == 1.0


def test_gap_metrics_by_position_bucket():
    T = 1100
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, 10:] = True  # loss-token index = position − 10
    student, teacher = torch.zeros(1, T, dtype=D), torch.arange(T, dtype=D)[None] % 7
    metrics = sampled_token_diagnostics(mask, student_logprob=student, teacher_logprob=teacher)
    index = torch.arange(T) - 10
    for name, lo, hi in [("@0-63", 0, 64), ("@64-255", 64, 256), ("@256-1023", 256, 1024), ("@1024+", 1024, T)]:
        gap = teacher[0][(index >= lo) & (index < hi)]
        assert metrics["gap_mean" + name] == pytest.approx(gap.mean().item(), rel=1e-12)
        assert metrics["gap_std" + name] == pytest.approx(gap.std(unbiased=False).item(), rel=1e-12)
    short = sampled_token_diagnostics(mask[:, :20], student_logprob=student[:, :20], teacher_logprob=teacher[:, :20])
    assert "gap_mean@0-63" in short and "gap_mean@64-255" not in short
    _, opd_metrics = sampled_token_opd(student, student, teacher, mask)
    assert opd_metrics["gap_mean"] == pytest.approx(metrics["gap_mean"])
