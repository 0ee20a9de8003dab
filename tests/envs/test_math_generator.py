"""Tests for envs.math.generator: determinism, distinctness, levels, and solutions that grade as correct."""
from __future__ import annotations

import pytest

from envs.math import extract_answer, generate_problems, grade


def test_deterministic_by_seed() -> None:
    assert generate_problems(30, seed=5) == generate_problems(30, seed=5)
    assert generate_problems(30, seed=5) != generate_problems(30, seed=6)


def test_keys_levels_and_distinct() -> None:
    problems = generate_problems(200, seed=0, levels=(1, 3))
    assert all(set(p) == {"problem", "answer", "solution", "level"} for p in problems)
    assert {p["level"] for p in problems} == {1, 3}
    assert len({p["problem"] for p in problems}) == 200


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_solutions_are_short_and_verified(level: int) -> None:
    for problem in generate_problems(12, seed=level, levels=(level,)):
        assert extract_answer(problem["solution"]) == problem["answer"]
        assert len(problem["solution"]) < 300
        assert grade(problem["solution"], problem["answer"])


def test_answers_are_computed() -> None:
    for problem in generate_problems(100, seed=1, levels=(1, 2)):
        expression = problem["problem"].removeprefix("What is ").removesuffix("?")
        left, op, right = expression.split()
        a, b = int(left), int(right)
        assert int(problem["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[op]
    for problem in generate_problems(50, seed=1, levels=(3,)):
        a, rest = problem["problem"].removeprefix("Solve for x: ").rstrip(".").split("x ", 1)
        sign, b, _, c = rest.split()
        x = int(problem["answer"])
        assert int(a) * x + (int(b) if sign == "+" else -int(b)) == int(c)


def test_level4_answers_are_reduced() -> None:
    for problem in generate_problems(40, seed=2, levels=(4,)):
        answer = problem["answer"]
        assert answer.lstrip("-").isdigit() or answer.lstrip("-").startswith("\\frac{")


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown difficulty levels"):
        generate_problems(3, levels=(5,))
    with pytest.raises(ValueError, match="distinct problems"):
        generate_problems(7_000, levels=(3,))


def test_level0_fixed_width_format() -> None:
    problems = generate_problems(300, seed=3, levels=(0,))
    assert problems == generate_problems(300, seed=3, levels=(0,))
    assert problems != generate_problems(300, seed=4, levels=(0,))
    assert len({p["problem"] for p in problems}) == 300
    for problem in problems:
        a, op, b = problem["problem"].removeprefix("What is ").removesuffix("?").split()
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert op == "+" and int(problem["answer"]) == int(a) + int(b)
        lines = problem["solution"].split("\n")
        # The same layout every time: two 8-character column lines, then the answer padded to 3 digits.
        assert [len(line) for line in lines] == [8, 8, 11]
        assert lines[0][:3] == f"{a[1]}{op}{b[1]}" and lines[1][:3] == f"{a[0]}{op}{b[0]}"
        assert lines[2] == f"\\boxed{{{int(problem['answer']):03d}}}"
        assert extract_answer(problem["solution"]).lstrip("0").zfill(1) == problem["answer"]


@pytest.mark.parametrize("seed", [0, 1])
def test_level0_solutions_grade_correct(seed: int) -> None:
    for problem in generate_problems(15, seed=seed, levels=(0,)):
        assert grade(problem["solution"], problem["answer"])


def test_level0_is_opt_in_and_leaves_other_levels_unchanged() -> None:
    default = generate_problems(40, seed=7)
    assert {p["level"] for p in default} == {1, 2, 3, 4}
    assert generate_problems(40, seed=7, levels=(1, 2, 3, 4)) == default
    assert default[0]["solution"].endswith(f"\\boxed{{{default[0]['answer']}}}")
