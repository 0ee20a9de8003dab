"""The support path's subsample diagnostics are unbiased and state their precision: on a batch laid out like
fixed-template answers (a period that divides an evenly spaced scheme's stride), the mean over seeds of the estimate
equals the exact value within its standard error, the stated standard error matches the spread over seeds, empty
rows stay finite, and a micro-batch within the budget is exact. The learner combines micro-batches' errors."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.learner.batching import micro_batches
from opd_agents.learner.learner import Learner
from opd_agents.learner.losses import sampled_token_diagnostics, subsample_se
from opd_agents.learner.metric_sums import accumulate_metrics, finish_metrics
from opd_agents.learner.support_logits import diagnostic_rows
from tests.learner.test_learner import _cfg, _samples, _teacher

BUDGET = 256
PERIOD = 8  # the template's period; an evenly spaced scheme over B·L = 4096 positions has stride 16


def _structured(B: int = 8, L: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask (B, L) with two empty rows' tails, and per-position entropy and gap (B, L): high-entropy, large-gap
    positions every PERIOD tokens (say the first token of each templated field), low elsewhere, small noise."""
    g = torch.Generator().manual_seed(0)
    high = torch.arange(L) % PERIOD == 0
    entropy = torch.where(high, 2.0, 0.1).expand(B, L) + 0.05 * torch.rand(B, L, generator=g, dtype=torch.float64)
    gap = torch.where(high, -3.0, -0.05).expand(B, L) + 0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.bool)
    return mask, entropy, gap


def _estimate(mask, entropy, gap, seed):
    known = torch.zeros(mask.numel(), dtype=torch.bool)
    known[diagnostic_rows(mask, BUDGET, seed)] = True
    return sampled_token_diagnostics(mask, entropy=entropy, student_logprob=-gap, teacher_logprob=torch.zeros_like(gap),
                                     student_mask=known.view_as(mask))


def test_estimates_are_unbiased_within_their_stated_error_where_a_fixed_stride_aliases():
    mask, entropy, gap = _structured()
    exact = {"entropy": float(entropy[mask].mean()), "gap_mean": float(gap[mask].mean())}
    runs = [_estimate(mask, entropy, gap, seed) for seed in range(400)]
    for key, value in exact.items():
        estimates = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        se = torch.tensor([r[f"{key}_se"] for r in runs], dtype=torch.float64)
        assert bool((se > 0).all())
        # Unbiased: the mean of n independent estimates is within 3 standard errors of the mean of the exact value.
        assert abs(float(estimates.mean()) - value) < 3 * float(se.mean()) / math.sqrt(len(runs))
        # The stated error is the actual spread of the estimate over seeds.
        assert float(se.mean()) == pytest.approx(float(estimates.std()), rel=0.15)
        # On this layout the evenly spaced subsample (stride 4096 / 256 = 16, a multiple of the period) sees only
        # the high positions: it is off by many standard errors, at every seed alike.
        where = mask.reshape(-1).nonzero().squeeze(1)
        even = where[torch.arange(BUDGET) * where.numel() // BUDGET]
        values = (entropy if key == "entropy" else gap).reshape(-1)
        assert abs(float(values[even].mean()) - value) > 20 * float(se.mean())


def test_fully_masked_rows_and_empty_masks_stay_finite():
    mask, entropy, gap = _structured(B=4, L=300)
    mask[1:3] = False  # two samples with nothing to train on
    entropy[1:3], gap[1:3] = float("nan"), float("inf")  # garbage where masked: never read
    metrics = _estimate(mask, entropy, gap, seed=1)
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["entropy_se"] > 0
    assert metrics["entropy"] == pytest.approx(float(entropy[mask].mean()), abs=6 * metrics["entropy_se"])
    empty = torch.zeros_like(mask)
    none = _estimate(empty, entropy, gap, seed=1)
    assert all(math.isfinite(v) for v in none.values()) and none["entropy_se"] == 0.0


def test_exact_with_zero_error_when_the_positions_fit_the_budget():
    mask, entropy, gap = _structured(B=2, L=128)  # 256 positions = the budget
    mask[1, 100:] = False
    metrics = _estimate(mask, entropy, gap, seed=5)
    assert metrics["entropy"] == pytest.approx(float(entropy[mask].mean()), rel=1e-12)
    assert metrics["gap_mean"] == pytest.approx(float(gap[mask].mean()), rel=1e-12)
    assert metrics["entropy_se"] == 0.0 and metrics["gap_mean_se"] == 0.0
    # The same holds for the full path, which passes no student_mask.
    full = sampled_token_diagnostics(mask, entropy=entropy)
    assert full["entropy"] == pytest.approx(metrics["entropy"], rel=1e-12) and full["entropy_se"] == 0.0


def test_subsample_se_is_the_finite_population_formula():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    population = torch.ones(5, dtype=torch.bool)
    sample = torch.tensor([True, False, True, True, False])
    picked = values[sample]
    want = math.sqrt((1 - 3 / 5) * float(picked.var()) / 3)
    assert float(subsample_se(values, sample, population)) == pytest.approx(want, rel=1e-12)
    assert float(subsample_se(values, population, population)) == 0.0


def test_micro_batch_metrics_average_over_the_micro_batches_that_report_them():
    acc: dict[str, float] = {}
    accumulate_metrics(acc, {"loss": 9.0, "entropy": 1.0, "entropy_se": 0.3, "gap_mean@64-255": -2.0}, 0.25)
    accumulate_metrics(acc, {"loss": 9.0, "entropy": 2.0, "entropy_se": 0.1}, 0.75)  # no long positions here
    got = finish_metrics(acc)
    assert set(got) == {"entropy", "entropy_se", "gap_mean@64-255"}
    assert got["entropy"] == pytest.approx(1.75) and got["gap_mean@64-255"] == pytest.approx(-2.0)  # not -0.5
    assert got["entropy_se"] == pytest.approx(math.hypot(0.25 * 0.3, 0.75 * 0.1))


def test_learner_draws_reproducible_seeds_and_combines_micro_batch_errors(tiny_model_dirs, tiny_tokenizer):
    samples = _samples(tiny_tokenizer, 4)
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 8)
    over = {"loss.k": 8, "loss.diagnostic_positions": 2, "optim.micro_batch_tokens": 40, "run.seed": 7}
    learner = Learner(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
    learner.optimizer.step = lambda: None  # the weights stay put: the per-micro-batch values below are the step's
    seeds = {learner.diagnostic_seed(j) for j in range(4)}
    assert len(seeds) == 4 and learner.diagnostic_seed(0) == learner.diagnostic_seed(0)
    groups = micro_batches(list(range(4)), samples, 40)
    assert len(groups) > 1
    batches = [learner._collate([samples[i] for i in g], [outs[i] for i in g]) for g in groups]
    total = float(sum(int(mb.loss_mask.sum()) for mb in batches))
    parts = [(float(mb.loss_mask.sum()) / total, learner._loss(mb, mb.loss_mask, total, 4.0, j)[1])
             for j, mb in enumerate(batches)]
    metrics = learner.update(samples, outs)
    assert metrics["entropy"] == pytest.approx(sum(share * m["entropy"] for share, m in parts), rel=1e-9)
    want_se = math.sqrt(sum((share * m["entropy_se"]) ** 2 for share, m in parts))
    assert want_se > 0 and metrics["entropy_se"] == pytest.approx(want_se, rel=1e-9)
    assert learner.diagnostic_seed(0) not in seeds  # the next optimizer step draws afresh


def test_diagnostics_chunk_changes_no_value(tiny_model_dirs, tiny_tokenizer, monkeypatch):
    """The no-grad diagnostics run in (rows, V) chunks of at most DIAGNOSTIC_CHUNK_ELEMENTS; one row per chunk gives
    the same metrics as one chunk for every row."""
    from opd_agents.learner import student

    samples = _samples(tiny_tokenizer, 4)
    outs = _teacher(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]), samples, 8)
    over = {"loss.k": 8, "loss.diagnostic_positions": 6, "run.seed": 3}

    def metrics(elements: int) -> dict[str, float]:
        monkeypatch.setattr(student, "DIAGNOSTIC_CHUNK_ELEMENTS", elements)
        learner = Learner(_cfg(tiny_model_dirs["student"], **over), str(tiny_model_dirs["student"]))
        return learner.update(samples, outs)

    whole, one_row = metrics(1 << 30), metrics(1)
    for key in ("entropy", "entropy_se", "gap_mean", "loss"):
        assert one_row[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-6), key  # float32 row sums
