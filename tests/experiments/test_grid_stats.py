"""The grid's statistics (`experiments.grid_stats`) and their table cells (`experiments.grid_report`) on
hand-computed numbers: Student's t p-values against closed forms and quadrature, mean ± standard error with every
run's value, and the paired t-test."""
from __future__ import annotations

import math

import pytest

from experiments import grid_report, grid_stats


def _t_p_by_quadrature(t: float, df: int, steps: int = 20000) -> float:
    """1 − 2 ∫_0^|t| f(x) dx with Student's t density f, by Simpson's rule: an independent check of the p-value."""
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = abs(t) / steps
    f = [norm * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 1 - 2 * h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_distribution_two_sided_p_values():
    assert grid_stats.t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=1e-4)  # the 97.5% quantiles of t tables
    assert grid_stats.t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-5)
    assert grid_stats.t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-4)
    assert grid_stats.t_two_sided_p(0.0, 3) == 1.0
    assert grid_stats.t_two_sided_p(-2.776, 4) == grid_stats.t_two_sided_p(2.776, 4)
    for t in (0.3, 1.0, 4.0, 40.0):  # closed forms: df 1 (Cauchy), df 2
        assert grid_stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
        assert grid_stats.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    for df in (3, 7, 30, 200):
        for t in (0.05, 0.9, 2.5):
            assert grid_stats.t_two_sided_p(t, df) == pytest.approx(_t_p_by_quadrature(t, df), abs=1e-9), (t, df)


def test_mean_se_and_cell_show_the_standard_error_and_every_run():
    stat = grid_stats.mean_se({"0": 0.380, "1": 0.423, "2": 0.400})
    # mean 40.1; deviations -2.1, 2.2, -0.1 points: sample var 9.26 / 2 = 4.63, SE sqrt(4.63 / 3) = 1.242 points
    assert stat["mean"] == pytest.approx(0.401) and stat["se"] == pytest.approx(math.sqrt(4.63 / 3) / 100)
    assert stat["n"] == 3 and stat["runs"] == ["0", "1", "2"]
    assert grid_report.stat_cell(stat, 100) == "40.1 ± 1.2 (38.0 / 42.3 / 40.0)"
    one = grid_stats.mean_se({"0": 0.4})
    assert one["se"] is None and grid_report.stat_cell(one, 100) == "40.0"  # no fake ± 0 for one run
    assert grid_report.stat_cell(None) == "–"


def test_paired_test_on_hand_computed_numbers():
    base = {"0": 0.30, "1": 0.40, "2": 0.50, "3": 0.9}  # seed 3 has no partner in `row`: not paired
    row = {"0": 0.35, "1": 0.50, "2": 0.55}
    # differences 5, 10, 5 points: mean 6.667, sample std sqrt(25/3) = 2.887, SE 1.667, t = 4, df 2
    test = grid_stats.paired_test(row, base)
    assert test["n"] == 3 and test["runs"] == ["0", "1", "2"]
    assert test["diff"] == pytest.approx(0.2 / 3) and test["se"] == pytest.approx(0.05 / 3)
    assert test["t"] == pytest.approx(4.0)
    assert test["p"] == pytest.approx(1 - 4 / math.sqrt(18))  # df 2: p = 1 − t / sqrt(2 + t²) = 0.0572
    assert grid_report.paired_cell(test) == "+6.7 ± 1.7, p = 0.057 (3 pairs)"
    single = grid_stats.paired_test({"0": 0.35}, base)
    assert (single["n"], single["se"], single["t"], single["p"]) == (1, None, None, None)
    assert grid_report.paired_cell(single) == "– (1 pair)"
    same = grid_stats.paired_test({"0": 0.35, "1": 0.45}, base)  # +5 points in both pairs: no spread, no test
    assert same["diff"] == pytest.approx(0.05) and same["se"] == 0 and same["p"] is None
