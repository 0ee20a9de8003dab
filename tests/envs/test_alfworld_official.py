"""The env on the official ALFWorld json_2.1.1 games (``../shared/data/alfworld``), as a user with
``alfworld-download`` data runs it: the games found and counted as ALFWorld counts them, the official split names
and the verl-agent ones, ``check_env`` with the paper config's env settings, the paper's per-turn prompt, and the
planner expert winning the games (all 140 ``valid_seen`` games in the slow test; the figure and seconds per game are
stored by ``python -m experiments.alfworld_expert``)."""
from __future__ import annotations

import os
from pathlib import Path

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers opd/*)
from envs.adapter import Turn
from envs.alfworld.catalog import TASK_TYPES
from envs.alfworld.data import find_games
from envs.alfworld.env import ALFWorldEnv
from opd_agents.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "alfworld"
pytestmark = pytest.mark.skipif(not (DATA / "json_2.1.1").is_dir(),
                                reason=f"official ALFWorld games not found at {DATA}/json_2.1.1 (../shared beside "
                                       "the project)")


def _paper_env_kwargs(split: str) -> dict:
    """The ALFWorld env kwargs of configs/paper/alternating.yaml, pointed at the official games."""
    config = load_config(ROOT / "configs" / "paper" / "alternating.yaml")
    [task] = [t for t in config.tasks if t.env_id == "opd/ALFWorld-v0"]
    return {**task.env_kwargs, "split": split, "data_path": str(DATA)}


def test_games_are_counted_as_alfworld_counts_them() -> None:
    # The shared copy: 140 solvable valid_seen games over all six task types, 200 train games.
    valid = find_games(DATA, "valid_seen")
    assert len(valid) == 140 and find_games(DATA, "eval_in_distribution") == valid  # official and our name
    assert len(find_games(DATA, "train")) == 200
    assert {Path(g).parent.parent.name.split("-")[0] for g in valid} == set(TASK_TYPES)


def test_alfworld_data_env_var_points_at_the_official_games(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALFWORLD_DATA", str(DATA))
    env = ALFWorldEnv(split="valid_seen", expert=None)
    assert len(env.game_files) == 140 and all(f.startswith(str(DATA)) for f in env.game_files)
    env.close()


def test_valid_unseen_is_a_clear_error_when_absent() -> None:
    with pytest.raises(FileNotFoundError, match="valid_unseen"):
        ALFWorldEnv(split="valid_unseen", data_path=DATA)


def test_check_env_with_the_paper_settings() -> None:
    # One game and no expert: the checker resets with several seeds, and loading an official game's engine
    # (grammar, PDDL) and the expert's fast-downward replanning are what it would time, not the env's API.
    env = gymnasium.make("opd/ALFWorld-v0", **_paper_env_kwargs("valid_seen"), expert=None, num_games=1)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_the_paper_per_turn_prompt_on_an_official_game() -> None:
    env = ALFWorldEnv(**_paper_env_kwargs("valid_seen"))
    adapter = env.prompt_adapter()
    first_obs, first_info = env.reset(options={"game": 0})
    observation, info, history = first_obs, first_info, []
    for _ in range(3):
        command = info["expert_action"]
        response = f"<think>the plan says {command}</think><action>{command}</action>"
        parsed = adapter.parse_action(response, info)
        assert parsed.action == command and not parsed.format_error
        next_obs, _, terminated, _, next_info = env.step(parsed.action)
        history.append(Turn(observation=observation, info=info, response=response, action=parsed.action))
        observation, info = next_obs, next_info
        if terminated:
            break
    [message] = adapter.turn_messages(first_obs, first_info, history, observation, info)
    prompt = message["content"]
    assert message["role"] == "user" and f"Your task is to: {first_info['task']}" in prompt
    assert f"you have already taken {len(history)} step(s)" in prompt
    for i, turn in enumerate(history[-2:], start=len(history) - 1):  # the paper's history of 2
        assert f"Action {i}: '{turn.action}'" in prompt
    assert all(f"'{a}'," in prompt for a in info["admissible_commands"] if a != "help")
    assert "<think> </think>" in prompt and "<action> </action>" in prompt
    env.close()


def _expert_results(**kwargs) -> dict:
    from experiments.alfworld_expert import run

    return run(str(DATA), "valid_seen", workers=min(2, os.cpu_count() or 1), **kwargs)


def test_the_planner_expert_wins_official_games() -> None:
    result = _expert_results(limit=4)
    assert result["games"] == 4 and result["win_rate"] == 1.0, result["lost"]


@pytest.mark.slow
def test_every_valid_seen_game_loads_and_plays() -> None:
    env = ALFWorldEnv(split="valid_seen", data_path=DATA, expert=None)
    for index in range(len(env.game_files)):
        observation, info = env.reset(options={"game": index})
        assert "Your task is to:" in observation and info["admissible_commands"], env.game_files[index]
        assert env.step("look")[0]
    env.close()


@pytest.mark.slow
def test_the_planner_expert_wins_two_games_of_every_task_type() -> None:
    # All 140 games take ~1 h on 2 cores (the planner replans every step, 30-100 s per kitchen game): that figure
    # is stored by `python -m experiments.alfworld_expert` (experiments/results/alfworld_official/).
    types = [Path(g).parent.parent.name.split("-")[0] for g in find_games(DATA, "valid_seen")]
    picked = [i for t in TASK_TYPES for i in [j for j, u in enumerate(types) if u == t][:2]]
    result = _expert_results(games=picked)
    assert result["games"] == 12 and result["win_rate"] == 1.0, result["lost"]
