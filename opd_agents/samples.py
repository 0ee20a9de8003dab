"""The data contract between rollout, teachers and the learner.

A `Sample` is one token sequence the learner trains on. Shapes use T = len(input_ids).
Position t of `loss_mask` / `behaviour_logprobs` refers to token `input_ids[t]`, predicted from
`input_ids[:t]` — so the model's logits at position t-1 score it. Only student-generated tokens have
`loss_mask[t] == 1`; prompt, chat-template and environment tokens are 0.

`TeacherTopK` is what a teacher returns for one sample: one row per loss position (N = sum(loss_mask)),
in increasing position order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Sample:
    """One training sequence (a whole conversation, or one turn with its history in the prompt).

    input_ids: (T,) token ids, the chat-templated text exactly as the student saw/produced it.
    loss_mask: (T,) 1 on student-generated tokens, else 0.
    behaviour_logprobs: (T,) the rollout policy's log-prob of each generated token (0.0 where loss_mask == 0).
    task: task name from the config (routes the teacher).
    reward, success: episode outcome (repeated on every sample of a multi-sample episode).
    episode_id: unique id of the episode; group_id: id of the prompt group (G rollouts share it).
    turn_spans: [start, end) token spans of each assistant response inside input_ids.
    messages: the chat messages this sample renders (assistant contents = the decoded responses);
        teachers with their own chat template re-render from these.
    metadata: free-form episode facts (turn index, task type, format errors, weight version, ...).
    """

    input_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    task: str
    reward: float = 0.0
    success: bool = False
    episode_id: str = ""
    group_id: str = ""
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"Sample fields disagree in length: input_ids={n}, loss_mask={len(self.loss_mask)}, "
                f"behaviour_logprobs={len(self.behaviour_logprobs)}; all three must have one entry per token."
            )
        if n and self.loss_mask[0]:
            raise ValueError("loss_mask[0] must be 0: the first token has no prefix to be predicted from.")

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def loss_positions(self) -> list[int]:
        """Indices t with loss_mask[t] == 1, increasing."""
        return [t for t, m in enumerate(self.loss_mask) if m]


@dataclass
class TeacherTopK:
    """A teacher's answer for one sample; N = sample.num_loss_tokens.

    topk_ids: (N, K) int64 — the teacher's K most likely next tokens at each loss position, descending.
    topk_logprobs: (N, K) float32 — their log-probs, normalised over the full vocabulary at temperature 1.
    sampled_logprobs: (N,) float32 — the teacher's log-prob of the token the student actually produced.
    scored: (N,) bool or None (= every row) — rows the teacher could score: False where the student's token has no
        counterpart in the teacher's vocabulary (`vocab_mismatch: mask | map`); the learner drops those rows.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    sampled_logprobs: torch.Tensor
    scored: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.dim() != 2:
            raise ValueError(
                f"TeacherTopK expects topk_ids and topk_logprobs of the same (N, K) shape, got "
                f"{tuple(self.topk_ids.shape)} and {tuple(self.topk_logprobs.shape)}."
            )
        if self.sampled_logprobs.shape != self.topk_ids.shape[:1]:
            raise ValueError(
                f"TeacherTopK.sampled_logprobs must be (N,) = ({self.topk_ids.shape[0]},), "
                f"got {tuple(self.sampled_logprobs.shape)}."
            )
        scored = self.scored
        if scored is not None and (scored.shape != self.topk_ids.shape[:1] or scored.dtype != torch.bool):
            raise ValueError(f"TeacherTopK.scored must be a (N,) = ({self.topk_ids.shape[0]},) bool tensor, got "
                             f"{tuple(self.scored.shape)} {self.scored.dtype}.")

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])
