"""Tests for opd_agents/learner/masks.py on hand-made sequences and brute-force references."""
from __future__ import annotations

import math

import pytest
import torch

from opd_agents.learner.masks import entropy_top_ratio_mask, entropy_top_ratio_per_sample, special_token_mask

# Two responses (runs of 1s) separated by environment tokens; 9 is a special token, (7, 8) a two-token marker.
IDS = torch.tensor([1, 9, 2, 9, 7, 8, 3, 9, 9, 7, 8, 7, 8, 4, 7])
LOSS = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1])


def _kept(new_mask: torch.Tensor) -> list[int]:
    return [i for i, (old, new) in enumerate(zip(LOSS.tolist(), new_mask.tolist())) if old and not new]


def test_first_occurrence_per_response_single_id():
    # Response 1 = positions 1..5, response 2 = 8..12, response 3 = 14; position 7 is a 9 outside any response.
    assert _kept(special_token_mask(IDS, LOSS, [9], mode="first")) == [1, 8]


def test_every_occurrence_single_id():
    assert _kept(special_token_mask(IDS, LOSS, [9], mode="all")) == [1, 3, 8]


def test_multi_token_marker_first_and_all():
    assert _kept(special_token_mask(IDS, LOSS, [(7, 8)], mode="first")) == [4, 5, 9, 10]
    assert _kept(special_token_mask(IDS, LOSS, [(7, 8)], mode="all")) == [4, 5, 9, 10, 11, 12]


def test_mixed_markers_are_handled_independently():
    assert _kept(special_token_mask(IDS, LOSS, [9, [7, 8]], mode="first")) == [1, 4, 5, 8, 9, 10]


def test_marker_must_lie_inside_one_response():
    ids = torch.tensor([0, 7, 8, 7, 8, 0])
    # (7, 8) at 1-2 starts in the prompt; at 3-4 it ends on an environment token.
    loss = torch.tensor([0, 0, 1, 1, 0, 1])
    assert special_token_mask(ids, loss, [(7, 8)], mode="all").tolist() == loss.tolist()
    # The lone 7 at the end of a sequence cannot start a 2-token match.
    assert special_token_mask(torch.tensor([0, 5, 7]), torch.tensor([0, 1, 1]), [(7, 8)]).tolist() == [0, 1, 1]


def test_batched_rows_are_independent_and_dtype_is_kept():
    ids = torch.stack([IDS, IDS.flip(0)])
    loss = torch.stack([LOSS, LOSS.flip(0)]).float()
    out = special_token_mask(ids, loss, [9], mode="first")
    assert out.dtype == torch.float32
    assert out[0].tolist() == special_token_mask(IDS, LOSS, [9]).float().tolist()
    assert out[1].tolist() == special_token_mask(IDS.flip(0), LOSS.flip(0), [9]).float().tolist()
    assert torch.equal(loss[0], LOSS.float())  # input untouched


def test_overlapping_repeats_in_all_mode():
    ids, loss = torch.tensor([0, 5, 5, 5, 6]), torch.tensor([0, 1, 1, 1, 1])
    assert special_token_mask(ids, loss, [(5, 5)], mode="all").tolist() == [0, 0, 0, 0, 1]
    assert special_token_mask(ids, loss, [(5, 5)], mode="first").tolist() == [0, 0, 0, 1, 1]


def test_no_markers_and_bad_mode():
    assert torch.equal(special_token_mask(IDS, LOSS, []), LOSS)
    with pytest.raises(ValueError, match="first"):
        special_token_mask(IDS, LOSS, [9], mode="last")


def _brute_entropy_top(entropy: list[float], mask: list[bool], ratio: float) -> list[bool]:
    candidates = [i for i in range(len(mask)) if mask[i]]
    keep = math.ceil(ratio * len(candidates))
    chosen = sorted(candidates, key=lambda i: (-entropy[i], i))[:keep]
    return [i in chosen for i in range(len(mask))]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_entropy_top_ratio_matches_brute_force(ratio):
    g = torch.Generator().manual_seed(0)
    entropy = torch.randint(0, 4, (3, 7), generator=g).float()  # many ties
    mask = torch.rand(3, 7, generator=g) > 0.3
    got = entropy_top_ratio_mask(entropy, mask, ratio)
    expected = _brute_entropy_top(entropy.flatten().tolist(), mask.flatten().tolist(), ratio)
    assert got.flatten().tolist() == expected
    assert got.dtype == torch.bool and not (got & ~mask).any()


def test_entropy_top_ratio_edge_cases():
    entropy = torch.tensor([0.1, 0.9, 0.5, 0.9])
    assert entropy_top_ratio_mask(entropy, torch.tensor([1, 1, 1, 0]), 0.5).tolist() == [0, 1, 1, 0]
    assert entropy_top_ratio_mask(entropy, torch.zeros(4), 0.2).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="ratio"):
        entropy_top_ratio_mask(entropy, torch.ones(4), 0.0)


def _brute_per_sample(entropy: list[float], mask: list[bool], ratio: float) -> list[bool]:
    """The paper's rule for one sample: k = max(1, ⌊ratio·n⌋); keep every masked token at least as high as the k-th
    highest masked entropy (ties at the threshold all kept)."""
    values = sorted((e for e, m in zip(entropy, mask) if m), reverse=True)
    if not values:
        return [False] * len(mask)
    k = max(1, math.floor(ratio * len(values)))
    return [bool(m) and e >= values[k - 1] for e, m in zip(entropy, mask)]


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5, 0.99, 1.0])
def test_entropy_top_ratio_per_sample_matches_brute_force(ratio):
    g = torch.Generator().manual_seed(1)
    entropy = torch.randint(0, 4, (2, 5, 9), generator=g).double() / 3  # many ties
    mask = torch.rand(2, 5, 9, generator=g) > 0.3
    mask[0, 0] = False  # a sample with no masked token keeps none
    got = entropy_top_ratio_per_sample(entropy, mask, ratio)
    for i in range(2):
        for j in range(5):
            assert got[i, j].tolist() == _brute_per_sample(entropy[i, j].tolist(), mask[i, j].tolist(), ratio)
    assert got.dtype == torch.bool and not (got & ~mask).any() and not got[0, 0].any()


def test_entropy_top_ratio_per_sample_keeps_ties_and_at_least_one():
    entropy = torch.tensor([[0.1, 0.5, 0.5, 0.2, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert entropy_top_ratio_per_sample(entropy, mask, 0.2).tolist() == [[0, 1, 1, 0, 0]]  # ⌊0.8⌋ → 1, a tie → 2
    assert entropy_top_ratio_per_sample(entropy, mask, 0.75).tolist() == [[0, 1, 1, 1, 0]]  # ⌊3⌋ = 3
    # Per sample, unlike the pooled selection: a low-entropy sample still keeps its own top tokens.
    both = torch.tensor([[5.0, 6.0, 7.0, 8.0], [0.1, 0.2, 0.3, 0.4]])
    assert entropy_top_ratio_per_sample(both, torch.ones(2, 4), 0.5).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert entropy_top_ratio_mask(both, torch.ones(2, 4), 0.5).tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="ratio"):
        entropy_top_ratio_per_sample(entropy, mask, 0.0)
