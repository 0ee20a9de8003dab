"""Task schedules: alternating round-robin, weighted draws, mixed splits, per-task prompt counts; pure in
(seed, step)."""
from __future__ import annotations

from collections import Counter

from opd_agents.config import build_config
from opd_agents.run.schedule import TaskSchedule


def _cfg(kind: str, *overrides: str):
    data = {
        "student": {"path": "student"},
        "rollout": {"prompts_per_step": 8},
        "teachers": {"t": {"model": "teacher"}},
        "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t", "weight": 3.0},
                  {"name": "alfworld", "env_id": "opd/ALFWorld-v0", "teacher": "t"}],
        "schedule": {"kind": kind},
    }
    return build_config(data, list(overrides))


def test_alternating_is_round_robin_in_config_order():
    schedule = TaskSchedule(_cfg("alternating"))
    assert [schedule.tasks_at(s) for s in range(4)] == [{"math": 8}, {"alfworld": 8}, {"math": 8}, {"alfworld": 8}]


def test_per_task_prompts_per_step_sizes_that_task_s_steps_only():
    schedule = TaskSchedule(_cfg("alternating", "tasks.alfworld.prompts_per_step=2"))
    assert [schedule.tasks_at(s) for s in range(2)] == [{"math": 8}, {"alfworld": 2}]


def test_weighted_draws_follow_weights_and_replay_identically():
    cfg = _cfg("weighted", "run.seed=5")
    first = [TaskSchedule(cfg).tasks_at(s) for s in range(400)]
    assert first == [TaskSchedule(cfg).tasks_at(s) for s in range(400)]  # a resumed run sees the same sequence
    counts = Counter(name for plan in first for name in plan)
    assert 0.65 < counts["math"] / 400 < 0.85  # weight 3 : 1
    assert first != [TaskSchedule(_cfg("weighted", "run.seed=6")).tasks_at(s) for s in range(400)]


def test_mixed_splits_every_step_by_weight():
    schedule = TaskSchedule(_cfg("mixed"))
    assert schedule.tasks_at(0) == schedule.tasks_at(7) == {"math": 6, "alfworld": 2}
    tiny = TaskSchedule(_cfg("mixed", "rollout.prompts_per_step=1"))
    assert tiny.tasks_at(0) == {"math": 1, "alfworld": 1}  # every task keeps at least one prompt
