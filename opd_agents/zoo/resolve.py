"""`zoo:<name>` model paths -> the built zoo folders (building the zoo on first use).

Called once per run at the entry points (`opd_agents.run.preflight.resolve_models`): everything downstream —
rollout workers, teachers, the learner — receives plain folders.
"""
from __future__ import annotations

from pathlib import Path

from opd_agents.zoo.build import DEFAULT_RECIPE, build_version, ensure_zoo, with_build_seed
from opd_agents.zoo.paths import PREFIX, ZOO_NAMES, cache_root


def zoo_dir(version: str | None = None, build_seed: int = 0) -> Path:
    """The folder of the zoo for a build recipe (the default recipe under ``build_seed`` when ``version`` is
    None)."""
    return cache_root() / (version or build_version(with_build_seed(DEFAULT_RECIPE, build_seed)))


def resolve_model_path(path: str, build_seed: int = 0) -> str:
    """``zoo:<name>`` -> the model folder of the zoo built under ``build_seed`` (building it on first use);
    anything else unchanged."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    if name not in ZOO_NAMES:
        known = ", ".join(PREFIX + n for n in ZOO_NAMES)
        raise ValueError(f"unknown zoo model {path!r}; the embedded zoo has {known}")
    return str(ensure_zoo(build_seed=build_seed) / name)
