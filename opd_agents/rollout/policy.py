"""The student-policy interface the episode loop generates with (backends: hf_policy, vllm_policy; factory: backends).

A policy maps B prompts (lists of token ids, no padding) to B `Generation`s. Per generation, `token_ids`
and `logprobs` have the same length L_b <= max_new_tokens; `token_ids` ends with the stop token when
`finish_reason == "stop"` (the stop token is part of the response and is trained on) and nothing follows
it. `logprobs` are behaviour log-probs under the truncated sampling distribution (see sampling.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from opd_agents.sampling import SamplingParams


@dataclass
class Generation:
    """One sampled response: its token ids, per-token behaviour log-probs and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Policy(ABC):
    """A student replica that samples responses and accepts weight updates tagged with a version."""

    version: int = 0

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Sample one response per prompt, all in one batched call."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights with the learner's (HF parameter names) and record their version."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + response the model accepts, in tokens."""
