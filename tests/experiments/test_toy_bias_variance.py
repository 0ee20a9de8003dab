"""The toy bias–variance study: γ = 1 is unbiased for the enumerated sequence-level gradient, γ = 0 is biased,
the variance grows with γ, and γ = 0 is exactly the library's sampled-token OPD gradient."""
from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import toy_bias_variance as toy
from opd_agents.learner.losses import sampled_token_opd

SMALL = toy.ToyConfig(vocab=2, lengths=(3, 6), gammas=(0.0, 0.5, 1.0), batch=4, variance_batches=4000, steps=30,
                      seeds=2, lr=1.0)


@pytest.fixture(scope="module")
def results():
    return toy.run(SMALL)


def _rows(results, task):
    return {r["gamma"]: r for r in results["tasks"][task]["rows"]}


def test_gamma_one_is_unbiased_and_gamma_zero_is_not(results):
    for task in ("T=3", "T=6"):
        rows = _rows(results, task)
        assert rows[1.0]["relative_bias"] < 1e-10  # exact expectation by enumeration == autograd ∇KL
        # Monte Carlo: the mean over M sampled batches lies within a few standard errors of the exact gradient.
        assert rows[1.0]["mc_bias"] < 4 * math.sqrt(rows[1.0]["variance"] / SMALL.variance_batches)
        assert rows[0.0]["relative_bias"] > 0.05 and rows[0.0]["cosine"] < 0.999


def test_variance_grows_with_gamma(results):
    for task in ("T=3", "T=6"):
        rows = _rows(results, task)
        variances = [rows[g]["variance"] for g in SMALL.gammas]
        assert variances == sorted(variances) and variances[-1] > 1.5 * variances[0]
        for r in rows.values():  # the measured variance agrees with the enumerated one
            assert r["mc_variance"] == pytest.approx(r["variance"], rel=0.15)


def test_learning_curves_decrease_the_exact_kl(results):
    for task in results["tasks"].values():
        for runs in task["curves"].values():
            assert len(runs) == SMALL.seeds and all(len(c) == SMALL.steps + 1 for c in runs)
            assert all(c[-1] < 0.5 * c[0] for c in runs)


def test_gamma_zero_equals_the_library_sampled_token_opd_gradient():
    gen = torch.Generator().manual_seed(1)
    task = toy.enumerate_task(4, 3)
    shape = (4 * 4, 3)
    teacher = torch.randn(shape, dtype=toy.DTYPE, generator=gen)
    student = torch.randn(shape, dtype=toy.DTYPE, generator=gen)
    rows = torch.tensor([0, 5, 17, 17, 80])
    ours = toy.per_sequence_estimates(student, teacher, task, 0.0, rows).mean(0)
    theta = student.clone().requires_grad_(True)
    lp = toy.token_logprobs(theta, task, rows)
    loss, _ = sampled_token_opd(lp, lp.detach(), toy.token_logprobs(teacher, task, rows),
                                torch.ones_like(lp, dtype=torch.bool), aggregation="seq_mean_token_sum")
    (grad,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(ours, grad.reshape(-1))


def test_main_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "toy"
    assert toy.main(["--out", str(out), "--vocab", "2", "--lengths", "2", "4", "--gammas", "0", "1",
                     "--steps", "5", "--seeds", "1", "--variance-batches", "100"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["tasks"]) == {"T=2", "T=4"}
    assert "| γ |" in (out / "results.md").read_text()
    assert (out / "plots" / "bias_variance.png").is_file() and (out / "plots" / "learning_curves.png").is_file()


def _brute_returns(r, m, gamma):
    out = [0.0] * len(r)
    for t in range(len(r)):
        if m[t]:
            steps = [t2 for t2 in range(t, len(r)) if m[t2]]
            out[t] = sum(gamma**k * r[t2] for k, t2 in enumerate(steps))
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_discounted_returns_match_brute_force(gamma):
    g = torch.Generator().manual_seed(15)
    rewards = torch.randn(2, 3, 13, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, 13, generator=g) > 0.3
    got = toy.discounted_returns(rewards, mask, gamma)
    for idx in [(i, j) for i in range(2) for j in range(3)]:
        expected = _brute_returns(rewards[idx].tolist(), mask[idx].tolist(), gamma)
        assert torch.allclose(got[idx], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_discounted_returns_long_sequence_is_stable():
    rewards, mask = torch.ones(5000), torch.ones(5000)
    got = toy.discounted_returns(rewards, mask, 0.5)
    assert torch.isfinite(got).all() and got[0].item() == pytest.approx(2.0) and got[-1].item() == 1.0
