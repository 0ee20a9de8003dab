"""Draw frequencies of `StepSampler` at a Qwen-sized vocabulary against an exact top-p reference.

What: three fixed rows of V = 151,936 logits, each shaped so that its top-p nucleus is found by a different path of
the sampler: peaked (inside the first partial sort of NUCLEUS_PROBES), medium (needs the second), wide (larger than
every probe: whole sorted rows). For each, 10^6 seeded draws are binned (one bin per nucleus token, most likely first,
the tail merged until every bin expects >= 5 draws) and a chi-square test against the exact top-p distribution, a
float64 full sort written out here, must give p > 1e-3; no draw may land outside the nucleus, and the behaviour
log-probs must be the reference's at the drawn ids. A negative control runs the same chi-square against wrong
references and must reject them (p < 1e-3), so the test has the power to see a sampler drawing from the wrong
distribution.

Why: the small-V frequency test in test_policy.py cannot reach the probes, and the probes are where the sampler
departs from a plain full sort. (The two-level inverse-CDF draw over whole rows runs only without a cut, top_p = 1 and
top_k = 0, so no top-p row reaches it; that test checks its frequencies.)

How the draws stay cheap: the sampler draws one token per row, and a row of V = 152k costs ~1 ms (peaked) to ~30 ms
(wide) on one core, so 10^6 draws as repeated rows would take minutes to hours. `_ManyDrawsPerRow` draws many tokens
from one row by asking the sampler's own `_uniform` (its only source of randomness) for many uniforms per row, and
leaves the rest of the step as it is; a check against the unmodified sampler on a batch of identical rows, same
seed, shows that its draws and log-probs are the sampler's own, bit for bit.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from opd_agents.sampling import NUCLEUS_PROBES, SamplingParams, StepSampler, processed_logprobs

VOCAB = 151_936  # Qwen2.5's
PARAMS = SamplingParams(top_p=0.9)
DRAWS = 10**6  # per shape
MIN_EXPECTED = 5.0  # draws a chi-square bin must expect
ALPHA = 1e-3
SAME_ROWS = 32  # rows of the batch that the unmodified sampler draws from in the equivalence check

# Shape → (std of the N(0, std²) logits, the size of the partial sort that holds its nucleus; VOCAB: whole rows).
SHAPES: dict[str, tuple[float, int]] = {
    "peaked": (5.0, NUCLEUS_PROBES[0]),
    "medium": (3.0, NUCLEUS_PROBES[1]),
    "wide": (1.0, VOCAB),
}


class _ManyDrawsPerRow(StepSampler):
    """A `StepSampler` that draws `draws` tokens from each row instead of one: the sampler's own uniforms, asked for
    (B, draws) of them, and the step's inverse CDF, gather and log-prob broadcast over them, so a call returns
    ((B, draws) ids, (B, draws) log-probs)."""

    def __init__(self, params: SamplingParams, generator: torch.Generator, draws: int) -> None:
        super().__init__(params, generator)
        self.draws = draws

    def _uniform(self, total: torch.Tensor) -> torch.Tensor:
        return super()._uniform(total.expand(-1, self.draws))


def _logits(shape: str) -> torch.Tensor:
    """The shape's (1, V) float32 logits, the same on every run."""
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * SHAPES[shape][0]


def _exact_nucleus(logits: torch.Tensor, top_p: float, extra: int = 0) -> torch.Tensor:
    """(1, V) logits → (V,) float64 top-p probabilities from a full sort: the smallest prefix, most likely first,
    whose mass reaches top_p (a token is kept while the mass strictly before it is < top_p), plus `extra` tokens,
    renormalised; 0 outside."""
    probs = torch.softmax(logits[0].double(), -1)
    vals, ids = probs.sort(descending=True)
    n = int(((vals.cumsum(0) - vals) < top_p).sum()) + extra
    return torch.zeros_like(probs).index_put_((ids[:n],), vals[:n] / vals[:n].sum())


def _chi_square(counts: torch.Tensor, reference: torch.Tensor) -> tuple[float, int, float]:
    """(V,) draw counts against (V,) reference probabilities whose support holds every draw → (statistic, degrees of
    freedom, p-value). Bins: the support's tokens, most likely first, one per bin while it expects >= MIN_EXPECTED
    draws; then the tail in order, each bin closed once it expects that many, and a last short one merged into the
    bin before it. The p-value is the chi-square survival function, Q(dof / 2, statistic / 2)."""
    assert int(counts[reference == 0].sum()) == 0
    order = torch.argsort(reference, descending=True)
    order = order[reference[order] > 0]
    expected = int(counts.sum()) * reference[order]
    labels, label, acc = [], 0, 0.0
    for e in expected.tolist():
        labels.append(label)
        acc += e
        if acc >= MIN_EXPECTED:
            label, acc = label + 1, 0.0
    bins = torch.tensor(labels)
    if acc > 0:
        bins[bins == label] = label - 1
    want = torch.bincount(bins, weights=expected)
    got = torch.bincount(bins, weights=counts[order].double())
    assert float(want.min()) >= MIN_EXPECTED
    stat, dof = float(((got - want) ** 2 / want).sum()), len(want) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return stat, dof, float(p)


@dataclass(frozen=True)
class _Drawn:
    logits: torch.Tensor  # (1, V) float32
    reference: torch.Tensor  # (V,) float64, the exact top-p distribution
    ids: torch.Tensor  # (DRAWS,)
    logprobs: torch.Tensor  # (DRAWS,) float32 behaviour log-probs


def _draw(shape: str) -> _Drawn:
    logits = _logits(shape)
    ids, logprobs = _ManyDrawsPerRow(PARAMS, torch.Generator().manual_seed(1), DRAWS)(logits)
    return _Drawn(logits, _exact_nucleus(logits, PARAMS.top_p), ids[0], logprobs[0])


@pytest.fixture(scope="module")
def drawn() -> Callable[[str], _Drawn]:
    """Shape → its draws, made once per module (the frequency test and the negative control share them)."""
    return functools.cache(_draw)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_takes_its_own_path_and_the_many_draws_are_the_samplers_own(shape: str,
                                                                              monkeypatch: pytest.MonkeyPatch):
    logits = _logits(shape)
    held = SHAPES[shape][1]
    # The nucleus size implies the path: more tokens than the partial sort before `held`, at most `held`.
    bounds = (0, *NUCLEUS_PROBES, VOCAB)
    n = int((_exact_nucleus(logits, PARAMS.top_p) > 0).sum())
    assert bounds[bounds.index(held) - 1] < n <= held
    # The sampler takes that path: its last (partial) sort has `held` tokens.
    sorted_sizes: list[int] = []
    topk, sort = torch.topk, torch.sort

    def topk_spy(x: torch.Tensor, k: int, **kwargs: Any) -> Any:
        sorted_sizes.append(k)
        return topk(x, k, **kwargs)

    def sort_spy(x: torch.Tensor, **kwargs: Any) -> Any:
        sorted_sizes.append(x.shape[-1])
        return sort(x, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "topk", topk_spy)
        patch.setattr(torch, "sort", sort_spy)
        ids, logprobs = StepSampler(PARAMS, torch.Generator().manual_seed(2))(logits.expand(SAME_ROWS, -1))
    assert sorted_sizes[-1] == held, sorted_sizes
    # One row with SAME_ROWS uniforms draws what SAME_ROWS identical rows with one each draw.
    many_ids, many_logprobs = _ManyDrawsPerRow(PARAMS, torch.Generator().manual_seed(2), SAME_ROWS)(logits)
    assert torch.equal(many_ids[0], ids) and torch.equal(many_logprobs[0], logprobs)


@pytest.mark.parametrize("shape", SHAPES)
def test_draw_frequencies_match_the_exact_nucleus(shape: str, drawn: Callable[[str], _Drawn]):
    d = drawn(shape)
    # The reference is the sampler's own: the same nucleus, log-probs equal to float32 rounding (|log p| < 16).
    processed = processed_logprobs(d.logits, PARAMS)[0]
    kept = d.reference > 0
    assert torch.equal(torch.isfinite(processed), kept)
    torch.testing.assert_close(processed[kept].double(), d.reference[kept].log(), rtol=0, atol=1e-5)
    counts = torch.bincount(d.ids, minlength=VOCAB)
    assert int(counts.sum()) == DRAWS and int(counts[~kept].sum()) == 0  # no draw outside the nucleus
    assert torch.equal(d.logprobs, processed[d.ids])  # bit for bit on the same logits
    torch.testing.assert_close(d.logprobs.double(), d.reference[d.ids].log(), rtol=0, atol=1e-5)
    stat, dof, p = _chi_square(counts, d.reference)
    assert p > ALPHA, f"{shape}: nucleus of {int(kept.sum())} tokens, chi2 = {stat:.1f} on {dof} dof, p = {p:.3g}"


WRONG_REFERENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # A sampler that ignores top-p.
    "untruncated softmax": lambda logits: torch.softmax(logits[0].double(), -1),
    # A sampler whose nucleus keeps one token too many. Only visible where that token expects many draws: the peaked
    # row's ~1,150 of 10^6; the medium row's ~14 and the wide row's ~3 are below what a chi-square resolves.
    "nucleus one token larger": lambda logits: _exact_nucleus(logits, PARAMS.top_p, extra=1),
}


@pytest.mark.parametrize("shape, wrong", [*((shape, "untruncated softmax") for shape in SHAPES),
                                          ("peaked", "nucleus one token larger")])
def test_the_chi_square_rejects_a_wrong_reference(shape: str, wrong: str, drawn: Callable[[str], _Drawn]):
    d = drawn(shape)
    stat, dof, p = _chi_square(torch.bincount(d.ids, minlength=VOCAB), WRONG_REFERENCES[wrong](d.logits))
    assert p < ALPHA, f"{shape} against the {wrong}: chi2 = {stat:.1f} on {dof} dof, p = {p:.3g}"
