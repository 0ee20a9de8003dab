"""Which eval items a policy plays: the whole split, or a seeded sample stratified like it.

With `eval_episodes` below the split's size, taking the first N items would evaluate whatever the split's order
puts first (official ALFWorld splits are sorted by task type: 42 games are 2 of its 6 types). Instead
:func:`stratified_sample` draws, per stratum (ALFWorld's task type; math's subject and level where rows carry
them), a share of N proportional to the stratum's size (largest remainders), each stratum's items drawn with a
seeded RNG. The same config and seed give the same ids for the student before, after and the teacher, so the
paired before/after test compares the same items. Envs say their strata through an `item_strata` property (one
label per item, in item order) and their size through `num_items`; an env without them plays items 0..N-1.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import gymnasium

from opd_agents.config import TaskConfig


def stratified_sample(strata: Sequence[Any], n: int, seed: int) -> list[int]:
    """`n` item ids (sorted) out of `len(strata)`, each stratum's share proportional to its size (Hamilton's
    largest remainders, ties broken by the seeded RNG), every item when `n` covers them all."""
    if n >= len(strata):
        return list(range(len(strata)))
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(strata):
        groups[str(label)].append(index)
    names = sorted(groups)
    quotas = {name: n * len(groups[name]) / len(strata) for name in names}
    counts = {name: int(quotas[name]) for name in names}
    by_remainder = sorted(names, key=lambda name: (-(quotas[name] - counts[name]), rng.random()))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return sorted(i for name in names for i in rng.sample(groups[name], counts[name]))


def eval_item_ids(task: TaskConfig, seed: int) -> list[int] | None:
    """The item ids `task` is evaluated on (a stratified sample when `eval_episodes` is below the split's size), or
    None for an env that does not say its size (items 0..eval_episodes-1)."""
    env = gymnasium.make(task.env_id, **{**task.env_kwargs, **task.eval_env_kwargs})
    try:
        size = getattr(env.unwrapped, "num_items", None)
        if size is None:
            return None
        strata = getattr(env.unwrapped, "item_strata", None)
        strata = [None] * size if strata is None else list(strata)
    finally:
        env.close()
    return stratified_sample(strata, task.eval_episodes, seed)
