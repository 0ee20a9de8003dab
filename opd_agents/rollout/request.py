"""What a rollout group asks a worker to do, and how training / evaluation episodes are laid out.

Training: P prompts × G rollouts. Prompt i resets with one seed drawn from the request seed; its G
rollouts reuse that seed (and options), so they see the same prompt, and share a group_id.
Evaluation: distinct items (0..n-1, or the item ids the evaluator sampled), each reset with seed = its id and the
options selecting it (see `eval_options`), k samples each.
"""
from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opd_agents.config import TaskConfig
from opd_agents.rollout.episode import EpisodeSpec
from opd_agents.sampling import SamplingParams
from opd_agents.seeding import mix_seed


@dataclass
class RolloutRequest:
    """One worker's share of a call. `version` is the weight version the worker must hold; `counter`, when set, an
    `EpisodeCounter` (or its Ray actor handle) the worker adds each finished episode to."""

    task: TaskConfig
    specs: list[EpisodeSpec]
    params: SamplingParams
    version: int
    seed: int | None
    evaluation: bool = False
    counter: Any = None


def training_specs(task: str, num_prompts: int, group_size: int, seed: int) -> list[EpisodeSpec]:
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]  # ids stay unique across calls even if the caller reuses a seed
    specs = []
    for i in range(num_prompts):
        reset_seed = rng.randrange(2**31)
        group = f"{task}-{tag}-p{i}"
        specs += [EpisodeSpec(f"{group}-g{j}", group, reset_seed) for j in range(group_size)]
    return specs


# The reset-option keys that select an item by number: opd/Math-v0 reads "index", opd/ALFWorld-v0 "game".
# Each env ignores the other's key.
EVAL_ITEM_KEYS = ("index", "game")


def eval_options(index: int) -> dict[str, Any]:
    """Reset options selecting eval item `index`."""
    return {key: index for key in EVAL_ITEM_KEYS}


def eval_specs(task: str, items: int | Sequence[int], k: int) -> list[EpisodeSpec]:
    """k specs per eval item: items 0..items-1 for an int, else the given item ids, in that order."""
    specs = []
    for i in range(items) if isinstance(items, int) else items:
        group = f"{task}-eval-{i}"
        specs += [EpisodeSpec(f"{group}-k{j}", group, i, eval_options(i)) for j in range(k)]
    return specs


def split(specs: list[EpisodeSpec], parts: int) -> list[list[EpisodeSpec]]:
    """Contiguous, near-equal chunks (empty chunks dropped)."""
    size, extra = divmod(len(specs), parts)
    chunks, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        chunks.append(specs[start:end])
        start = end
    return [c for c in chunks if c]


def chunk_seed(seed: int | None, index: int) -> int | None:
    # Distinct per chunk: two workers must not draw the same stream for copies of one prompt.
    return None if seed is None else mix_seed(seed, index)
