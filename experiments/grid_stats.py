"""The comparison grid's per-cell statistics (`experiments.grid`): a cell's mean ± standard error of the mean over
runs, and the paired two-sided t-test of one row against another over the runs both have, its p-value from Student's
t distribution via the regularized incomplete beta function (continued fraction, modified Lentz method).

Written out here rather than taken from scipy: the framework does not depend on scipy, and one t-distribution tail
is a few dozen lines (checked in the tests against closed forms and quadrature)."""
from __future__ import annotations

import math
import statistics
from typing import Any


def mean_se(by_run: dict[str, float]) -> dict[str, Any]:
    """One cell's statistics over runs (run key → value, at least one): mean, standard error of the mean (sample
    std / √n; None for a single run, whose spread is unknown), n, and the values with the runs they came from."""
    values = list(by_run.values())
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "n": len(values), "values": values, "runs": list(by_run)}


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, I_x(a, b) = x^a (1 − x)^b / (a B(a, b)) ·
    1 / (1 + d1 / (1 + d2 / (1 + …))) with d(2m+1) = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)) and
    d(2m) = m (b − m) x / ((a + 2m − 1)(a + 2m)), evaluated by the modified Lentz method (the scheme of Numerical
    Recipes' `betacf`); it converges quickly for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300  # stands in for a zero denominator
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)  # 1 + d1
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        delta = 1.0
        for coeff in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coeff * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coeff / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < 1e-14:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1, from the continued fraction on whichever side converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with `df` degrees of freedom: I_{df / (df + t²)}(df / 2, 1 / 2)."""
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_test(row: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    """Paired t-test of `row` against `base` (run key → value) over the runs both have: n pairs, the mean difference
    row − base (in the values' units), its SE, t and the two-sided p with n − 1 degrees of freedom. SE, t and p are
    None with fewer than 2 pairs; t and p are None when every pair differs by the same amount (SE 0)."""
    pairs = [k for k in row if k in base]
    # Success rates are fractions k/N: rounding keeps float noise from faking a spread of equal differences.
    diffs = [round(row[k] - base[k], 12) for k in pairs]
    out: dict[str, Any] = {"n": len(diffs), "runs": pairs, "diff": statistics.fmean(diffs) if diffs else None,
                           "se": None, "t": None, "p": None}
    if len(diffs) > 1:
        out["se"] = statistics.stdev(diffs) / math.sqrt(len(diffs))
        if out["se"] > 0:
            out["t"] = out["diff"] / out["se"]
            out["p"] = t_two_sided_p(out["t"], len(diffs) - 1)
    return out
