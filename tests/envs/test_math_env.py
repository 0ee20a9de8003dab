"""Tests for envs.math.env (opd/Math-v0) and envs.math.adapter: episodes, rewards, retries, data files, check_env."""
from __future__ import annotations

import json
from pathlib import Path

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401 - registers opd/Math-v0
from envs.adapter import get_adapter
from envs.math import MathEnv, MathPromptAdapter


@pytest.fixture
def env() -> MathEnv:
    return MathEnv(num_problems=40)


def test_make_without_arguments() -> None:
    made = gymnasium.make("opd/Math-v0")
    observation, info = made.reset(seed=0)
    assert isinstance(observation, str) and observation
    assert len(made.unwrapped.problems) == 900  # 1000 generated, 10% held out for eval
    assert isinstance(get_adapter(made), MathPromptAdapter)


def test_correct_answer_rewards_and_terminates(env: MathEnv) -> None:
    observation, info = env.reset(options={"index": 3})
    problem = env.problems[3]
    assert observation == problem["problem"] and info["index"] == 3 and "answer" not in info
    observation, reward, terminated, truncated, info = env.step(problem["solution"])
    assert (reward, terminated, truncated, observation) == (1.0, True, False, "Correct.")
    assert info["success"] and info["answer"] == problem["answer"] and info["extracted"] == problem["answer"]
    assert not info["format_error"] and info["grade_status"] == "correct"


def test_wrong_and_missing_answers_single_turn(env: MathEnv) -> None:
    env.reset(options={"index": 0})
    observation, reward, terminated, _, info = env.step("I think \\boxed{-12345}")
    assert (reward, terminated, info["success"]) == (0.0, True, False)
    assert observation == "Your answer -12345 is incorrect."
    env.reset(options={"index": 0})
    observation, reward, terminated, _, info = env.step("no idea")
    assert info["format_error"] and info["extracted"] is None and terminated and reward == 0.0
    assert observation.startswith("No final answer found.")


def test_multi_turn_retry() -> None:
    env = MathEnv(num_problems=20, max_attempts=3)
    env.reset(options={"index": 1})
    observation, reward, terminated, _, info = env.step("\\boxed{-999}")
    assert observation == "Your answer -999 is incorrect. Try again." and not terminated and reward == 0.0
    observation, reward, terminated, _, info = env.step("forgot the box")
    assert "Put your final answer within \\boxed{}" in observation and observation.endswith("Try again.")
    assert not terminated and info["attempt"] == 2
    observation, reward, terminated, _, info = env.step(env.problems[1]["solution"])
    assert (reward, terminated, info["success"], info["attempt"]) == (1.0, True, True, 3)


def test_attempts_run_out() -> None:
    env = MathEnv(num_problems=20, max_attempts=2)
    env.reset(options={"index": 0})
    assert env.step("\\boxed{-999}")[2] is False
    observation, reward, terminated, _, info = env.step("\\boxed{-998}")
    assert terminated and reward == 0.0 and not info["success"] and observation == "Your answer -998 is incorrect."


@pytest.mark.parametrize("action", [
    "", "x" * 100_000, "\\boxed{" + "9" * 100_000 + "}", "\x00\xff\ud800 junk", "\\boxed{\ud800\x00\x7f}",
    "\\boxed{1", "}}{{\\boxed{", b"\\boxed{7}", None,
])
def test_malformed_actions_get_feedback(env: MathEnv, action) -> None:
    env.reset(options={"index": 0})
    observation, reward, terminated, truncated, info = env.step(action)
    assert isinstance(observation, str) and reward in (0.0, 1.0) and terminated and not truncated
    parsed = env.prompt_adapter().parse_action(action, info)
    assert isinstance(parsed.action, str) and parsed.format_error == (info["extracted"] is None)


def test_step_outside_an_episode_is_feedback(env: MathEnv) -> None:
    observation, reward, terminated, _, info = env.step("\\boxed{1}")
    assert "call reset()" in observation and terminated and not info["success"]


def test_seeded_reset_and_index_option(env: MathEnv) -> None:
    first = [env.reset(seed=s)[0] for s in range(5)]
    assert first == [env.reset(seed=s)[0] for s in range(5)]
    assert len(set(first)) > 1
    with pytest.raises(ValueError, match=r"options\['index'\]"):
        env.reset(options={"index": 40})


def test_check_env() -> None:
    check_env(gymnasium.make("opd/Math-v0", num_problems=40).unwrapped)
    check_env(gymnasium.make("opd/Math-v0", num_problems=40, max_attempts=2).unwrapped)


def test_data_file_and_splits(tmp_path: Path) -> None:
    path = tmp_path / "aime.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train = MathEnv(data_path=path, eval_fraction=0.25, split_seed=3)
    evaluation = MathEnv(data_path=str(path), split="eval", eval_fraction=0.25, split_seed=3)
    assert (len(train.problems), len(evaluation.problems)) == (15, 5)
    assert {p["problem"] for p in train.problems}.isdisjoint(p["problem"] for p in evaluation.problems)
    assert len(MathEnv(data_path=path, split="all").problems) == 20
    explicit = MathEnv(data_path={"train": path, "eval": path}, split="eval")
    assert len(explicit.problems) == 20
    explicit.reset(options={"index": 4})
    assert explicit.step("so \\boxed{5}")[1] == 1.0


def test_constructor_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="generated problem set only"):
        MathEnv(data_path=tmp_path / "x.jsonl", num_problems=10)
    with pytest.raises(ValueError, match="answer_format"):
        MathEnv(answer_format="latex")
    with pytest.raises(ValueError, match="max_attempts"):
        MathEnv(max_attempts=0)
    with pytest.raises(FileNotFoundError):
        MathEnv(data_path=tmp_path / "missing.parquet")


def test_adapter_messages_and_overrides(env: MathEnv) -> None:
    messages = env.prompt_adapter().initial_messages("What is 1 + 1?", {})
    assert messages == [
        {"role": "system", "content": "Solve the math problem step by step."},
        {"role": "user", "content": "What is 1 + 1?\nPut your final answer within \\boxed{}."},
    ]
    custom = MathEnv(num_problems=8, system_prompt="", instruction="Box it.").prompt_adapter()
    assert custom.initial_messages("q", {}) == [{"role": "user", "content": "q\nBox it."}]
    assert custom.followup_message("Your answer 3 is incorrect. Try again.", {})["role"] == "user"


def test_answer_line_format() -> None:
    env = MathEnv(num_problems=8, answer_format="answer_line")
    env.reset(options={"index": 0})
    assert "Answer:" in env.prompt_adapter().instruction
    assert env.step(f"work\nAnswer: {env.problems[0]['answer']}")[1] == 1.0
