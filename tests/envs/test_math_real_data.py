"""The math env's named loaders and grader on the real GSM8K and MATH-500 files in ``../shared/data/math``.

Loading: every GSM8K train/test row and every MATH-500 row loads with its named ``data_format``; small synthetic
files pin the named formats' contract (columns, errors, GSM8K separators, MATH levels, DAPO) where the real files
are absent too.

Grading: the reference solutions graded as the env grades a response, and mismatched (solution, other answer)
pairs, with the pipeline of ``experiments/math_grader.py`` (which stores the figures; its docstring says how each
dataset's response is built). Thresholds: >= 99% of references correct, < 2% of mismatched pairs correct. The slow
test grades all 8,792 GSM8K rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.math import MathEnv, load_problems
from experiments import math_grader

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math"
GSM8K_FILES = {"gsm8k_train.jsonl": 7_473, "gsm8k_test.jsonl": 1_319}
MATH500 = DATA / "math500_test.jsonl"
MATH500_SUBJECTS = {"Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory",
                    "Prealgebra", "Precalculus"}
GSM8K_SAMPLE = 500

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real math data not found at {DATA} (../shared/data/math "
                                                          "beside the project, with GSM8K and MATH-500 files)")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_named_formats_on_synthetic_rows(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "2 * 540 = 1080\n#### 1,080"},
                                               {"question": "r", "answer": "#### -3.5"}])
    assert [p["answer"] for p in load_problems(gsm, "gsm8k")] == ["1080", "-3.5"]
    assert load_problems(gsm, "gsm8k")[0]["solution"] == "2 * 540 = 1080\n#### 1,080"
    rows = [{"problem": "p", "answer": "1", "level": 3, "subject": "Geometry", "unique_id": "test/geometry/1.json"},
            {"problem": "q", "answer": "2", "level": "Level 5"}, {"problem": "r", "answer": "3", "level": "Level ?"}]
    problems = load_problems(write_jsonl(tmp_path / "math.jsonl", rows), "math500")
    assert [(p["level"], p["subject"], p["unique_id"]) for p in problems] == [
        (3, "Geometry", "test/geometry/1.json"), (5, None, None), (None, None, None)]
    dapo = {"prompt": [{"role": "user", "content": "Solve the following math problem step by step. Go.\n\n1 + 1?"}],
            "reward_model": {"ground_truth": 2}}
    assert load_problems(write_jsonl(tmp_path / "dapo.jsonl", [dapo]), "dapo") == [{
        "problem": "1 + 1?", "answer": "2", "solution": None, "level": None, "subject": None, "unique_id": None}]


def test_named_format_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match="record 0 has no GSM8K final answer.*'#### <final answer>'"):
        load_problems(path, "gsm8k")
    path = write_jsonl(tmp_path / "dapo.jsonl", [{"prompt": "p", "reward_model": {"style": "rule"}}])
    with pytest.raises(ValueError, match=r"needs column 'reward_model.ground_truth'.*\['prompt', 'reward_model'\]"):
        load_problems(path, "dapo")
    path = write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(ValueError, match=r"needs column 'answer', but it is missing \(record 1\)"):
        load_problems(path, "math500")
    path = write_jsonl(tmp_path / "level.jsonl", [{"problem": "p", "answer": "1", "level": 7}])
    with pytest.raises(ValueError, match="level 7, not a MATH level 1-5"):
        load_problems(path, "math")
    with pytest.raises(ValueError, match="unknown data_format 'GSM8K'; choose one of auto, gsm8k"):
        load_problems(path, "GSM8K")
    with pytest.raises(ValueError, match="unknown data_format 'csv'"):
        MathEnv(data_path=path, data_format="csv")
    with pytest.raises(ValueError, match="no data_path is given"):
        MathEnv(data_format="math500")


def gsm8k(name: str) -> list[dict]:
    return load_problems(DATA / name, "gsm8k")


def assert_grader_agrees(result: dict) -> None:
    assert result["references_correct"] >= 0.99 * result["references"], result["not_correct"]
    assert result["mismatched_pairs"] >= 0.9 * result["references"]
    assert result["mismatched_accepted"] < 0.02 * result["mismatched_pairs"], result["accepted"]


@needs_data
def test_every_gsm8k_row_loads() -> None:
    for name, count in GSM8K_FILES.items():
        problems = gsm8k(name)
        assert len(problems) == count
        for problem in problems:
            final = problem["solution"].rsplit("####", 1)[1].strip()  # as written, e.g. "1,080"
            assert problem["problem"] and problem["answer"] == final.replace(",", "")
            assert problem["answer"].lstrip("-").isdigit(), problem["answer"]  # every GSM8K final is an integer
            assert problem["level"] is None and problem["subject"] is None
    with pytest.raises(ValueError, match=r"needs column 'problem'.*found columns \['answer', 'question'\]"):
        load_problems(DATA / "gsm8k_test.jsonl", "math500")


@needs_data
def test_every_math500_row_loads() -> None:
    problems = load_problems(MATH500, "math500")
    assert len(problems) == 500
    assert all(p["problem"] and p["answer"] and p["solution"] for p in problems)
    assert {p["level"] for p in problems} == {1, 2, 3, 4, 5}
    assert {p["subject"] for p in problems} == MATH500_SUBJECTS
    assert len({p["unique_id"] for p in problems}) == 500
    assert load_problems(MATH500, "math") == problems
    with pytest.raises(ValueError, match=r"needs column 'question'.*found columns \['answer', 'level', 'problem'"):
        load_problems(MATH500, "gsm8k")


@needs_data
def test_math_env_on_real_files() -> None:
    env = MathEnv(data_path=MATH500, data_format="math500", split="all")
    assert env.num_items == 500
    _, info = env.reset(options={"index": 0})
    assert info["subject"] == env.problems[0]["subject"] and info["level"] == env.problems[0]["level"]
    *_, info = env.step(env.problems[0]["solution"])
    assert info["success"] and info["subject"] == env.problems[0]["subject"]
    train = MathEnv(data_path={"train": DATA / "gsm8k_train.jsonl", "eval": DATA / "gsm8k_test.jsonl"},
                    data_format="gsm8k", split="eval")
    assert train.num_items == 1_319
    _, info = train.reset(options={"index": 0})
    assert info["level"] is None and info["subject"] is None


@needs_data
def test_grader_on_math500_reference_solutions() -> None:
    assert_grader_agrees(math_grader.math500(DATA))


@needs_data
def test_grader_on_gsm8k_test_sample() -> None:
    assert_grader_agrees(math_grader.gsm8k(DATA, "gsm8k_test.jsonl", sample=GSM8K_SAMPLE))


@needs_data
@pytest.mark.slow
def test_grader_on_all_gsm8k_rows() -> None:
    for name in GSM8K_FILES:
        assert_grader_agrees(math_grader.gsm8k(DATA, name))
