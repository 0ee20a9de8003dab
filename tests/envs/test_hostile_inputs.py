"""Hostile env inputs: pathological model output stays fast and gets feedback; bad kwargs fail at construction."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from envs.alfworld.data import find_games
from envs.alfworld.env import ALFWorldEnv
from envs.math.answers import MAX_TEXT_LENGTH, extract_answer
from envs.math.env import MathEnv

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alfworld" / "json_2.1.1"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("filler", [" ", "\t", " \t"])
def test_answer_line_extraction_is_linear_in_whitespace_runs(filler: str) -> None:
    # The former whole-text regex took ~55 s on this input; the line-anchored one a few milliseconds.
    text = "Answer:" + filler * (MAX_TEXT_LENGTH // len(filler)) + "x"
    assert extract_answer(text, "answer_line") == "x"
    assert extract_answer("answer" + " " * MAX_TEXT_LENGTH, "answer_line") is None
    assert extract_answer("Answer: 3\nmore\n  Final answer:  **7**  \n", "answer_line") == "7"


def test_response_over_the_length_limit_is_feedback_not_a_grade() -> None:
    env = MathEnv(num_problems=5)
    env.reset(options={"index": 0})
    response = "\\boxed{" + env.problems[0]["answer"] + "}" + " " * MAX_TEXT_LENGTH
    observation, reward, terminated, _, info = env.step(response)
    assert reward == 0.0 and terminated and info["grade_status"] == "too_long" and info["format_error"]
    assert f"longer than {MAX_TEXT_LENGTH}" in observation
    assert env.prompt_adapter().parse_action(response, info).format_error


@pytest.mark.parametrize("kwargs", [
    {"grading_timeout": math.inf}, {"grading_timeout": math.nan}, {"grading_timeout": 0},
    {"grading_timeout": "5"}, {"answer_format": "latex"}, {"max_attempts": 0},
])
def test_math_env_rejects_bad_kwargs(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MathEnv(num_problems=5, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"max_steps": math.nan}, {"max_steps": 0}, {"max_steps": 2.5}, {"max_steps": True},
    {"num_games": 0}, {"num_games": -3}, {"num_games": 1.5},
])
def test_alfworld_env_rejects_bad_kwargs(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ALFWorldEnv(**kwargs)


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"official ALFWorld games not found at {OFFICIAL}")
def test_excluded_task_folders_are_judged_by_their_own_name(tmp_path: Path) -> None:
    games = sorted((OFFICIAL / "valid_seen").iterdir())[:2]
    root = tmp_path / "Sliced-movable-runs" / "data"
    for game in games:
        shutil.copytree(game, root / "json_2.1.1" / "valid_seen" / game.name)
    shutil.copytree(games[0], root / "json_2.1.1" / "valid_seen" / f"{games[0].name.split('-')[0]}-AppleSliced-x-1")
    found = find_games(root, "valid_seen")
    assert sorted(Path(f).parent.parent.name for f in found) == [g.name for g in games]


def test_a_dotted_capital_before_the_action_tag_does_not_shift_the_command() -> None:
    from envs.alfworld.prompt import ALFWorldPromptAdapter

    info = {"admissible_commands": ["go to desk 1", "look"]}
    parsed = ALFWorldPromptAdapter().parse_action("İİİ <think>x</think><action>go to desk 1</action>", info)
    assert parsed.action == "go to desk 1" and parsed.details["valid"] and not parsed.details.get("snapped")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"pddl_domain": "x"}'])
def test_a_non_game_file_as_options_game_is_a_clear_error(tmp_path: Path, content: str) -> None:
    env = ALFWorldEnv(num_games=1)
    bogus = tmp_path / "game.tw-pddl"
    bogus.write_text(content)
    (tmp_path / "traj_data.json").write_text('{"task_type": "pick_and_place_simple"}')
    with pytest.raises(ValueError, match="is not an ALFWorld game"):
        env.reset(options={"game": str(tmp_path)})
    env.close()
