"""Turning a finished episode's token record into `Sample`s (both sample modes) and its JSON-safe metadata.

Token convention (see opd_agents.samples): one flat list per sample; `loss_mask` is 1 exactly on the
student's generated ids (the stop token included), behaviour log-probs sit on the same positions and are
0.0 elsewhere; `turn_spans` are the [start, end) spans of the generated ids.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from opd_agents.rollout.policy import Generation
from opd_agents.samples import Sample


@dataclass
class TokenRecord:
    """An append-only token sequence with its loss mask, behaviour log-probs and response spans."""

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)

    def add_context(self, ids: list[int]) -> None:
        self.input_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def add_generation(self, gen: Generation) -> None:
        start = len(self.input_ids)
        self.input_ids += gen.token_ids
        self.loss_mask += [1] * len(gen.token_ids)
        self.logprobs += gen.logprobs
        self.spans.append((start, len(self.input_ids)))


def jsonable(info: dict[str, Any]) -> dict[str, Any]:
    """The entries of an env info dict that survive JSON (NaN/inf and objects are dropped)."""
    kept = {}
    for key, value in info.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        kept[str(key)] = value
    return kept


def make_sample(record: TokenRecord, messages: list[dict[str, str]], *, task: str, reward: float, success: bool,
                episode_id: str, group_id: str, metadata: dict[str, Any]) -> Sample:
    reward = float(reward) if math.isfinite(reward) else 0.0
    return Sample(
        input_ids=list(record.input_ids), loss_mask=list(record.loss_mask),
        behaviour_logprobs=[float(x) for x in record.logprobs], task=task, reward=reward, success=bool(success),
        episode_id=episode_id, group_id=group_id, turn_spans=list(record.spans),
        messages=[dict(m) for m in messages], metadata=metadata,
    )
