"""ALFWorld vocabulary shared by the generator and the environment: task types, split names, held-out combos.

Owns the *names*: the six ALFWorld task types (ids as in ``alfworld.agents.environment.alfred_tw_env``), the
project's split names and the official aliases for them, and the rule that decides which task combinations are
held out of training (the out-of-distribution split). Nothing here imports textworld.
"""
from __future__ import annotations

import hashlib

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

SPLITS: tuple[str, ...] = ("train", "eval_in_distribution", "eval_out_of_distribution")

# The official ALFWorld folder names (json_2.1.1/<split>) and the names its config uses, mapped to ours.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "eval_in_distribution": "eval_in_distribution",
    "eval_out_of_distribution": "eval_out_of_distribution",
    "valid_seen": "eval_in_distribution",
    "valid_unseen": "eval_out_of_distribution",
    "eval_id": "eval_in_distribution",
    "eval_ood": "eval_out_of_distribution",
}

# Folder names that may hold a split on disk, ours first, then the official one.
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "eval_in_distribution": ("eval_in_distribution", "valid_seen"),
    "eval_out_of_distribution": ("eval_out_of_distribution", "valid_unseen"),
}

# Who fills info["expert_action"]: fast-downward replanning from the current state, or ALFWorld's handcoded agent.
EXPERTS: tuple[str, ...] = ("planner", "handcoded")

# One in this many (task type, object, receptacle/lamp) combinations is held out for the OOD split.
HELD_OUT_EVERY = 4


def canonical_split(split: str) -> str:
    """Our split name for ``split`` (ours or an official alias); a clear error for anything else."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown ALFWorld split {split!r}; expected one of {sorted(SPLIT_ALIASES)}") from None


def canonical_task_types(task_types: list[str | int] | tuple[str | int, ...] | None) -> tuple[str, ...]:
    """Task-type names from names or the official 1-based ids (``env.task_types: [1, 2, ...]``)."""
    if task_types is None:
        return TASK_TYPES
    names = []
    for t in task_types:
        name = TASK_TYPES[t - 1] if isinstance(t, int) and 1 <= t <= len(TASK_TYPES) else t
        if name not in TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type {t!r}; expected a name in {list(TASK_TYPES)} or an id 1-6")
        names.append(name)
    if not names:
        raise ValueError("task_types is empty; pass None for all six ALFWorld task types")
    return tuple(dict.fromkeys(names))


def combo_key(task_type: str, obj: str, target: str) -> str:
    """The combination a split is judged on: task type, object class and receptacle (or lamp) class."""
    return f"{task_type}/{obj}/{target}"


def is_held_out(task_type: str, obj: str, target: str) -> bool:
    """Whether a combination belongs to the OOD split only.

    A stable hash (not Python's salted ``hash``) so the partition is the same in every process and release.
    """
    digest = hashlib.sha256(combo_key(task_type, obj, target).encode()).digest()
    return digest[0] % HELD_OUT_EVERY == 0
