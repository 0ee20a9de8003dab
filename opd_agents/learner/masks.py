"""Token-selection masks applied to a loss mask before the loss (pure tensor code).

Owns: special-token masking (the paper's fix for tokenizer / special-token mismatch) and entropy top-ratio token
selection, per sample as the paper's code does (`entropy_top_ratio_per_sample`) or pooled over a batch
(`entropy_top_ratio_mask`). Shapes: `(..., T)` with T the token axis (last dim) and any leading batch dims. A loss
mask is bool or 0/1; each function returns a new mask of the same dtype and never edits its input. The losses
themselves live in `opd_agents/learner/losses.py`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Marker = int | Sequence[int]


def _as_marker(marker: Marker) -> tuple[int, ...]:
    ids = (int(marker),) if isinstance(marker, int) else tuple(int(i) for i in marker)
    if not ids:
        raise ValueError("an empty token-id sequence cannot be masked")
    return ids


def _marker_starts(input_ids: torch.Tensor, in_response: torch.Tensor, marker: tuple[int, ...]) -> torch.Tensor:
    """`(..., T)` bool: positions where `marker` starts and lies entirely inside loss tokens."""
    T = input_ids.shape[-1]
    starts = torch.zeros_like(in_response)
    span = T - len(marker) + 1
    if span <= 0:
        return starts
    hit = torch.ones_like(in_response[..., :span])
    for j, token in enumerate(marker):
        hit &= (input_ids[..., j : j + span] == token) & in_response[..., j : j + span]
    starts[..., :span] = hit
    return starts


def _first_per_response(starts: torch.Tensor, in_response: torch.Tensor) -> torch.Tensor:
    """Keep, in every maximal run of `in_response`, only the earliest True of `starts` `(..., T)`."""
    previous = torch.zeros_like(in_response)
    previous[..., 1:] = in_response[..., :-1]
    run_start = in_response & ~previous
    seen = starts.long().cumsum(-1)
    # Matches seen before each run's start; cummax carries it along the run (seen is non-decreasing).
    before_run = torch.where(run_start, seen - starts.long(), torch.zeros_like(seen)).cummax(-1).values
    return starts & (seen - before_run == 1)


def special_token_mask(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    token_ids_to_mask: Sequence[Marker],
    mode: Literal["first", "all"] = "first",
) -> torch.Tensor:
    """Remove configured special tokens / marker sequences from the loss mask, inside each assistant response.

    input_ids, loss_mask: `(..., T)`. A response is a maximal run of loss_mask == 1. token_ids_to_mask: single ids
    and/or id tuples (a marker string that tokenises to several ids); a tuple matches only where all its ids are
    consecutive loss tokens of one response, and then all of them are masked. mode="first": per response, only the
    first occurrence of EACH marker (as the paper's code does); "all": every occurrence (overlapping ones included).
    Returns the new loss mask `(..., T)`, same dtype as loss_mask.
    """
    if mode not in ("first", "all"):
        raise ValueError(f"mode={mode!r} is not one of ('first', 'all')")
    in_response = loss_mask.bool()
    drop = torch.zeros_like(in_response)
    for marker in {_as_marker(m) for m in token_ids_to_mask}:
        starts = _marker_starts(input_ids, in_response, marker)
        if mode == "first":
            starts = _first_per_response(starts, in_response)
        for j in range(len(marker)):
            drop[..., j:] |= starts[..., : starts.shape[-1] - j]
    return (in_response & ~drop).to(loss_mask.dtype)


def entropy_top_ratio_per_sample(entropy: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep, in each sample (last dim), its `ratio` highest-entropy masked tokens: the paper code's selection.

    entropy, mask: `(..., T)`. A sample with n masked tokens keeps max(1, ⌊ratio · n⌋) of them: every masked token whose
    entropy is at least the entropy of its k-th highest, so tokens tied at that threshold are all kept (a sample may
    keep more than k). A sample with no masked token keeps none. ratio must lie in (0, 1].
    Returns the new mask `(..., T)`, same dtype as mask.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must lie in (0, 1]")
    m = mask.bool()
    values = entropy.detach().double()
    keep = (m.sum(-1).double() * ratio).floor().long().clamp(min=1)  # (...,)
    ranked = torch.where(m, values, torch.full_like(values, -math.inf)).sort(-1, descending=True).values
    threshold = ranked.gather(-1, (keep - 1).clamp(max=ranked.shape[-1] - 1).unsqueeze(-1))  # (..., 1)
    return (m & (values >= threshold)).to(mask.dtype)


def entropy_top_ratio_mask(entropy: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep only the top `ratio` fraction (by entropy) of the masked tokens of a whole batch (`loss.entropy_selection:
    pooled`).

    entropy, mask: `(...)`. Selection is per call, i.e. per (micro-)batch across all leading dims, not per sequence.
    Exactly ceil(ratio · n) of the n masked tokens are kept; ties at the threshold are broken in favour of the earlier
    position in flattened (row-major) order, so the result is deterministic. ratio must lie in (0, 1].
    Returns the new mask `(...)`, same dtype as mask.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must lie in (0, 1]")
    flat = mask.bool().reshape(-1)
    keep = math.ceil(ratio * int(flat.sum()))
    # Unmasked tokens sort last (-inf); a stable sort keeps equal entropies in position order.
    values = entropy.detach().reshape(-1).double()
    scores = torch.where(flat, values, torch.full_like(values, -math.inf))
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    selected = torch.zeros_like(flat)
    selected[order] = True
    return selected.reshape(mask.shape).to(mask.dtype)
