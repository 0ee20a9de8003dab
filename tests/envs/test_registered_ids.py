"""Gymnasium's `check_env`, warnings as errors, over every registered `opd/*` id with the kwargs the shipped CPU
configs train and evaluate with (an id no config uses is checked with its defaults)."""
from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the opd/ environments)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
OPD_IDS = sorted(k for k in gymnasium.registry if k.startswith("opd/") and not k.startswith("opd/Test"))


def cases() -> list[tuple[str, dict]]:
    out: dict[tuple[str, str], tuple[str, dict]] = {}
    for path in CONFIGS:
        for task in yaml.safe_load(path.read_text())["tasks"]:
            train = task.get("env_kwargs", {})
            for kwargs in (train, {**train, **task.get("eval_env_kwargs", {})}):
                out.setdefault((task["env_id"], repr(sorted(kwargs.items()))), (task["env_id"], kwargs))
    used = {env_id for env_id, _ in out.values()}
    return list(out.values()) + [(env_id, {}) for env_id in OPD_IDS if env_id not in used]


def test_every_shipped_config_env_is_registered():
    assert {"opd/Math-v0", "opd/ALFWorld-v0"} <= set(OPD_IDS)
    assert {env_id for env_id, _ in cases()} == set(OPD_IDS)


@pytest.mark.parametrize("env_id, kwargs", cases(), ids=lambda v: v if isinstance(v, str) else repr(v)[:60])
def test_check_env_passes_without_warnings(env_id, kwargs):
    env = gymnasium.make(env_id, **kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()
