"""ALFWorld for opd-agents: generated or official games played through the real TextWorld/ALFWorld engine.

Modules: ``catalog`` (task types, splits, held-out combos), ``scenes`` (rooms from the wheel's AI2-THOR
layouts), ``sample`` (one game's task and placements), ``problem`` (PDDL/traj_data/grammar files), ``generate``
(generator + replay check + CLI), ``data`` (default cache, official-layout discovery), ``engine`` (TextWorld +
ALFWorld wrappers), ``vocabulary`` (either data vintage's commands: conversion at load, near-miss placing commands),
``env`` (``opd/ALFWorld-v0``), ``prompt`` (the prompt adapter), ``memory`` (the agent state its ``memory=True``
prompts show), ``metrics``.

Importing this package stays light: textworld is imported only when a game is generated or played.
"""
from __future__ import annotations

from typing import Any

from envs.alfworld.catalog import SPLITS, TASK_TYPES
from envs.alfworld.metrics import success_by_task_type
from envs.alfworld.prompt import ALFWorldPromptAdapter

__all__ = ["ALFWorldEnv", "ALFWorldPromptAdapter", "SPLITS", "TASK_TYPES", "success_by_task_type"]


def __getattr__(name: str) -> Any:
    if name == "ALFWorldEnv":
        from envs.alfworld.env import ALFWorldEnv

        return ALFWorldEnv
    raise AttributeError(f"module 'envs.alfworld' has no attribute {name!r}")
