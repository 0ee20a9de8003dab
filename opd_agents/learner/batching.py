"""Samples + teacher answers -> padded micro-batches: the one place the learner's loss tensors are assembled.

Owns the `MicroBatch` tensors, the loss mask of a sample (its student tokens, minus special tokens under
`loss.special_tokens`, minus positions the teacher could not score: `TeacherTopK.scored`), the turn index of each
loss position (agent tasks' per-turn metrics), the support layout
(the teacher's K candidates as returned; optionally ∪ the sampled token; teacher ids without a student
counterpart masked out of the support), the episode mini-batches and the token-budget packing of a mini-batch into
micro-batches of similar lengths.

Shapes: B samples, T = longest sequence, L = most loss positions of a sample, K = support size. Row (b, l) of a
`(B, L, …)` tensor is the l-th loss position of sample b.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd_agents.learner import supports
from opd_agents.learner.masks import special_token_mask
from opd_agents.learner.reductions import LOGPROB_FLOOR
from opd_agents.samples import Sample, TeacherTopK


@dataclass
class MicroBatch:
    """Padded tensors of a micro-batch. input_ids/attention_mask (B, T); positions, loss_mask (B, L);
    support_ids, teacher_logprobs, support_mask (B, L, K); sampled_ids, behaviour (the rollout's processed
    log-probs), teacher_sampled (B, L); turns (B, L) the turn index of each loss row (`loss_turns`; -1 unknown), None
    when no sample says; old_logprobs (B, L) the student's recomputed log-prob of each sampled token before the update
    (`Learner`'s old-policy pass), None unless the loss asks for it; importance_weights (B, L) the off-policy
    correction's weights (`off_policy.py`), None unless `loss.off_policy_correction` is on."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    loss_mask: torch.Tensor
    support_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    support_mask: torch.Tensor | None
    sampled_ids: torch.Tensor
    behaviour: torch.Tensor
    teacher_sampled: torch.Tensor
    turns: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    importance_weights: torch.Tensor | None = None


def loss_turns(sample: Sample) -> torch.Tensor | None:
    """(N,) long: the 0-based assistant turn of each loss position — `metadata["turn"]` for a one-turn sample
    (`rollout.sample_mode: per_turn`), else the `turn_spans` span holding it (-1 outside every span); None when the
    sample carries neither."""
    if "turn" in sample.metadata:
        return torch.full((sample.num_loss_tokens,), int(sample.metadata["turn"]), dtype=torch.long)
    if not sample.turn_spans:
        return None
    pos = torch.tensor(sample.loss_positions(), dtype=torch.long)
    starts = torch.tensor([a for a, _ in sample.turn_spans], dtype=torch.long)
    ends = torch.tensor([b for _, b in sample.turn_spans], dtype=torch.long)
    span = (torch.searchsorted(starts, pos, right=True) - 1).clamp(min=0)
    inside = (pos >= starts[span]) & (pos < ends[span])
    return torch.where(inside, span, torch.full_like(span, -1))


def sample_loss_mask(sample: Sample, special_ids: Sequence[tuple[int, ...]], special_mode: str) -> torch.Tensor:
    """(T,) bool: the sample's student tokens, minus the configured special-token sequences (`masks.py`)."""
    mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
    if special_ids:
        mask = special_token_mask(torch.tensor(sample.input_ids), mask, list(special_ids), special_mode)
    return mask


def collate(samples: list[Sample], teacher: list[TeacherTopK], *, pad_id: int,
            special_ids: Sequence[tuple[int, ...]] = (), special_mode: str = "first", union_sampled: bool = False,
            device: torch.device | str = "cpu") -> MicroBatch:
    """One micro-batch from samples and their teacher answers (one `TeacherTopK` per sample, N rows each).

    `union_sampled`: the support is the teacher's candidates ∪ the sampled token (`supports.union_sampled_support`).
    """
    B, T = len(samples), max(len(s.input_ids) for s in samples)
    L = max(1, max(s.num_loss_tokens for s in samples))
    K = max(t.k for t in teacher)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    positions = torch.ones(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    ids = torch.zeros(B, L, K, dtype=torch.long)
    t_lp = torch.full((B, L, K), LOGPROB_FLOOR)
    sampled = torch.zeros(B, L, dtype=torch.long)
    behaviour = torch.zeros(B, L)
    t_sampled = torch.zeros(B, L)
    turns = torch.full((B, L), -1, dtype=torch.long)
    known_turns = False
    for b, (s, out) in enumerate(zip(samples, teacher)):
        n = s.num_loss_tokens
        if out.topk_ids.shape[0] != n:
            raise ValueError(f"teacher returned {out.topk_ids.shape[0]} rows for a sample with {n} loss tokens")
        input_ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids)
        attention[b, : len(s.input_ids)] = 1
        pos = torch.tensor(s.loss_positions(), dtype=torch.long)
        positions[b, :n] = pos
        loss_mask[b, :n] = sample_loss_mask(s, special_ids, special_mode)[pos]
        if out.scored is not None:
            loss_mask[b, :n] &= out.scored
        ids[b, :n, : out.k] = out.topk_ids
        t_lp[b, :n, : out.k] = out.topk_logprobs.float()
        sampled[b, :n] = input_ids[b, pos]
        behaviour[b, :n] = torch.tensor(s.behaviour_logprobs)[pos]
        t_sampled[b, :n] = out.sampled_logprobs.float()
        turn = loss_turns(s)
        if turn is not None:
            turns[b, :n], known_turns = turn, True
    support_mask = None
    if union_sampled:
        ids, t_lp, support_mask = supports.union_sampled_support(ids, t_lp, sampled, t_sampled)
    # Teacher ids without a student counterpart (teachers.vocab.UNMAPPED_ID = -1) are not in the support.
    if bool((ids < 0).any()):
        valid = ids >= 0
        support_mask = valid if support_mask is None else support_mask & valid
        ids = ids.clamp(min=0)
    return MicroBatch(input_ids.to(device), attention.to(device), positions.to(device), loss_mask.to(device),
                      ids.to(device), t_lp.to(device), None if support_mask is None else support_mask.to(device),
                      sampled.to(device), behaviour.to(device), t_sampled.to(device),
                      turns.to(device) if known_turns else None)


def episode_mini_batches(samples: list[Sample], episodes_per_step: int) -> list[list[int]]:
    """Sample indices split into mini-batches of `episodes_per_step` episodes each (0 = one mini-batch of all).

    `optim.mini_batch_size` counts episodes, not samples: a per-turn episode's samples count once and go into one
    mini-batch together, so a 50-turn ALFWorld step makes as many optimizer steps as a one-turn math step of as many
    episodes (counting per-turn samples, it would make ~50× more). Episodes are numbered in order of first appearance
    (`episode_id`; a sample without one is an episode of its own); indices keep their order inside a mini-batch."""
    if not episodes_per_step:
        return [list(range(len(samples)))] if samples else []
    ordinal: dict[str, int] = {}
    out: list[list[int]] = []
    for i, s in enumerate(samples):
        key = s.episode_id or f"\0sample {i}"
        n = ordinal.setdefault(key, len(ordinal)) // episodes_per_step
        out += [[] for _ in range(n + 1 - len(out))]
        out[n].append(i)
    return out


# The fixed cost of one more micro-batch, as a fraction of the token budget: a forward and backward launch and, under
# FSDP, every layer all-gathered again. Packing trades it against padded tokens.
MICRO_BATCH_COST = 0.03


def micro_batches(idx: list[int], samples: list[Sample], budget: int) -> list[list[int]]:
    """Samples `idx` packed into micro-batches whose padded size B × T stays within `budget` tokens (a longer sample
    goes alone), at the least padded tokens plus `MICRO_BATCH_COST` × budget per micro-batch.

    In length order a micro-batch holds samples of similar length (arrival order pads 1.2-1.7× the real tokens on
    long-tailed lengths, `padding_ratio`); the split of the sorted list is chosen by dynamic programming,
    O(n · samples per micro-batch). The update is the same whatever the grouping: every micro-batch's loss is
    normalised by the mini-batch's global counts. Indices keep their order inside a micro-batch."""
    order = sorted(idx, key=lambda i: (-len(samples[i].input_ids), i))
    lengths = [len(samples[i].input_ids) for i in order]
    overhead = MICRO_BATCH_COST * budget
    best = [0.0] + [float("inf")] * len(order)  # the least cost of packing each prefix of `order`
    start = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for first in range(end - 1, -1, -1):  # the micro-batch order[first:end]; its longest is order[first]
            padded = (end - first) * lengths[first]
            if end - first > 1 and padded > budget:
                break
            cost = best[first] + padded + overhead
            if cost < best[end]:
                best[end], start[end] = cost, first
    out, end = [], len(order)
    while end:
        out.append(sorted(order[start[end]:end]))
        end = start[end]
    return out[::-1]


def padding_ratio(groups: list[list[int]], samples: list[Sample]) -> float:
    """Padded tokens (B × T of every micro-batch) over real tokens: 1.0 = no padding."""
    real = sum(len(samples[i].input_ids) for g in groups for i in g)
    padded = sum(len(g) * max(len(samples[i].input_ids) for i in g) for g in groups if g)
    return padded / max(real, 1)
