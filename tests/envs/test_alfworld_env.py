"""``opd/ALFWorld-v0`` through the real engine: defaults, splits, official layout, feedback, truncation, checker."""
from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401 - registers opd/ALFWorld-v0
from envs.alfworld import data
from envs.alfworld.catalog import TASK_TYPES

SMALL_DEFAULT = {"train": 6, "eval_in_distribution": 2, "eval_out_of_distribution": 2}


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in set generated into a private cache (the real default is 60/30/30, see the slow test)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OPD_AGENTS_CACHE", str(tmp_path_factory.mktemp("opd_cache")))
    mp.delenv("ALFWORLD_DATA", raising=False)
    mp.setattr(data, "DEFAULT_COUNTS", SMALL_DEFAULT)
    root = data.default_games_root("train", workers=1)
    for split in ("eval_in_distribution", "eval_out_of_distribution"):
        assert data.default_games_root(split, workers=1) == root
    yield root
    mp.undo()


@pytest.fixture
def use_default(default_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(default_root.parents[1]))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # keeps a real ~/.cache/alfworld out of these tests
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setattr(data, "DEFAULT_COUNTS", SMALL_DEFAULT)
    return default_root


def test_make_without_arguments_plays_the_built_in_games(use_default: Path) -> None:
    env = gym.make("opd/ALFWorld-v0")
    obs, info = env.reset(seed=0)
    assert obs.startswith("You are in the middle of a room") and "Your task is to: " in obs
    assert "Welcome to TextWorld" not in obs
    assert set(info) >= {"admissible_commands", "won", "success", "task_type", "game_path", "expert_action"}
    assert info["task_type"] in TASK_TYPES and info["expert_action"] in info["admissible_commands"]
    assert info["task"] and info["task"] in obs
    total, done = 0.0, False
    while not done:  # the planner expert wins every generated game
        obs, reward, terminated, truncated, info = env.step(info["expert_action"])
        total += reward
        done = terminated or truncated
    assert terminated and info["won"] and info["success"] and total == 1.0
    env.close()
    env.close()  # idempotent


def test_empty_official_cache_falls_back_to_built_in_games(use_default: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing alfworld points $ALFWORLD_DATA at an empty ~/.cache/alfworld when the user set nothing.
    (tmp_path / "home" / ".cache" / "alfworld").mkdir(parents=True)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "home" / ".cache" / "alfworld"))
    assert gym.make("opd/ALFWorld-v0").unwrapped.data_path == str(use_default)


def test_split_names_and_task_filter(use_default: Path) -> None:
    for split, n in [("train", 6), ("valid_seen", 2), ("eval_out_of_distribution", 2), ("valid_unseen", 2)]:
        assert len(gym.make("opd/ALFWorld-v0", split=split).unwrapped.game_files) == n
    env = gym.make("opd/ALFWorld-v0", task_types=["pick_two_obj_and_place", 2]).unwrapped
    assert {Path(g).parent.parent.name.split("-")[0] for g in env.game_files} == {
        "pick_two_obj_and_place", "look_at_obj_in_light"}
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        gym.make("opd/ALFWorld-v0", split="test")


def test_data_path_with_official_folder_names(use_default: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    official = tmp_path / "alfworld_data" / "json_2.1.1"
    shutil.copytree(use_default / "json_2.1.1" / "eval_in_distribution", official / "valid_seen")
    env = gym.make("opd/ALFWorld-v0", data_path=tmp_path / "alfworld_data", split="eval_in_distribution")
    assert len(env.unwrapped.game_files) == 2
    game = env.unwrapped.game_files[1]
    _, info = env.reset(options={"game": game})
    assert info["game_path"] == game
    _, info = env.reset(options={"game": 0})
    assert info["game_path"] == env.unwrapped.game_files[0]
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "alfworld_data"))
    assert gym.make("opd/ALFWorld-v0", split="valid_seen").unwrapped.game_files == env.unwrapped.game_files
    with pytest.raises(FileNotFoundError, match="Expected the official layout"):
        gym.make("opd/ALFWorld-v0", data_path=tmp_path, split="train")


def test_invalid_actions_get_feedback_and_episode_truncates(use_default: Path) -> None:
    env = gym.make("opd/ALFWorld-v0", max_steps=4)
    env.reset(seed=1, options={"game": 0})
    for i, action in enumerate(["fly to the moon", "", "\x00\x01junk", "GO   TO nowhere"]):
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs == "Nothing happens." and reward == 0.0 and not terminated
        assert truncated == (i == 3) and info["steps"] == i + 1
    env.close()


def test_case_and_whitespace_are_normalised(use_default: Path) -> None:
    env = gym.make("opd/ALFWorld-v0")
    _, info = env.reset(seed=2, options={"game": 0})
    obs, *_ = env.step("  " + info["expert_action"].upper() + " ")
    assert obs != "Nothing happens."


def test_passes_gymnasium_env_checker(use_default: Path) -> None:
    env = gym.make("opd/ALFWorld-v0", split="valid_unseen")
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_prompt_adapter_comes_from_the_env(use_default: Path) -> None:
    from envs.adapter import get_adapter

    env = gym.make("opd/ALFWorld-v0", adapter={"history_length": 3, "compact": True})
    adapter = get_adapter(env)
    assert adapter.history_length == 3 and adapter.compact
    obs, info = env.reset(seed=0)
    (message,) = adapter.turn_messages(obs, info, [], obs, info)
    assert info["task"] in message["content"] and info["admissible_commands"][0] in message["content"]


@pytest.mark.slow
def test_real_default_set_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(tmp_path))
    for split, n in data.DEFAULT_COUNTS.items():
        assert len(data.find_games(data.default_games_root(split), split)) == n


_SCRIPTED_PLAY = """
import json, sys
import textworld.envs.pddl.textgen as textgen, textworld.logic as twlogic
if sys.argv[1] == "uncached":  # mark TextWorld's parsers as already wrapped, so install_caches leaves them alone
    for module in (textgen, twlogic):
        module._parse_and_convert._opd_cached = True
from envs.alfworld.env import ALFWorldEnv
env = ALFWorldEnv(split="train", expert=None)
transcript = []
for game in range(2):
    observation, info = env.reset(seed=game, options={"game": game})
    transcript.append(observation)
    for turn in range(6):
        commands = info["admissible_commands"]
        observation, _, terminated, truncated, info = env.step(commands[(turn * 7) % len(commands)])
        transcript.append([observation, commands])
        if terminated or truncated:
            break
print(json.dumps(transcript))
"""


def test_parse_caches_leave_every_observation_and_command_unchanged(use_default: Path) -> None:
    """The engine memoises TextWorld's grammar and logic parsers (several times faster steps): same text, byte for
    byte."""
    import subprocess
    import sys

    def play(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", _SCRIPTED_PLAY, mode], capture_output=True, text=True,
                              check=True, timeout=300)
        return done.stdout

    cached, uncached = play("cached"), play("uncached")
    assert cached and cached == uncached
