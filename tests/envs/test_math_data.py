"""Tests for envs.math.data: JSONL/JSON/Parquet loading with column aliases, errors, deterministic splits."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs.math import load_problems, split_problems


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 2 + 3?\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


@pytest.mark.parametrize("problem_key", ["problem", "question", "prompt"])
@pytest.mark.parametrize("answer_key", ["answer", "ground_truth"])
@pytest.mark.parametrize("writer, suffix", [(write_jsonl, ".jsonl"), (write_parquet, ".parquet")])
def test_column_aliases(tmp_path: Path, problem_key: str, answer_key: str, writer, suffix: str) -> None:
    path = writer(tmp_path / f"data{suffix}", [{problem_key: "What is 2 + 3?", answer_key: "5"}])
    assert load_problems(path) == [{"problem": "What is 2 + 3?", "answer": "5", "solution": None, "level": None,
                                   "subject": None, "unique_id": None}]


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, ".jsonl"), (write_parquet, ".parquet")])
def test_dapo_layout(tmp_path: Path, writer, suffix: str) -> None:
    row = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_PROMPT}],
           "reward_model": {"ground_truth": "5", "style": "rule-based"}}
    [problem] = load_problems(writer(tmp_path / f"dapo{suffix}", [row]))
    assert problem["problem"] == "What is 2 + 3?"
    assert problem["answer"] == "5"


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, ".jsonl"), (write_parquet, ".parquet")])
def test_solution_column_gives_last_boxed(tmp_path: Path, writer, suffix: str) -> None:
    row = {"problem": "Half of 1?", "solution": "Try \\boxed{2}. No: $\\boxed{\\frac{1}{2}}$.", "level": "Level 2"}
    [problem] = load_problems(writer(tmp_path / f"math{suffix}", [row]))
    assert problem["answer"] == "\\frac{1}{2}"
    assert problem["solution"] == row["solution"] and problem["level"] == "Level 2"


def test_answer_variants(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "Natalia sold 48 ... #### 72"}, {"question": "q2", "answer": 17},
            {"question": "q3", "answer": 0.25}]
    assert [p["answer"] for p in load_problems(write_jsonl(tmp_path / "gsm.jsonl", rows))] == ["72", "17", "0.25"]


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "aime.json"
    path.write_text(json.dumps([{"problem": "p", "answer": "204"}]))
    assert load_problems(path)[0]["answer"] == "204"


def test_missing_column_names_found_and_accepted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "What is 2 + 3?", "answer": "5"}])
    with pytest.raises(ValueError) as error:
        load_problems(path)
    message = str(error.value)
    assert "no problem column" in message and "['answer', 'text']" in message
    assert "problem, question, prompt" in message
    path = write_parquet(tmp_path / "bad.parquet", [{"problem": "What is 2 + 3?", "label": "5"}])
    with pytest.raises(ValueError, match=r"no answer column; found columns \['label', 'problem'\].*ground_truth"):
        load_problems(path)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(ValueError, match="no problems"):
        load_problems(write_parquet(tmp_path / "empty.parquet", []))
    (tmp_path / "broken.jsonl").write_text('{"problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_problems(tmp_path / "broken.jsonl")
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_problems(tmp_path / "data.csv")
    with pytest.raises(ValueError, match=r"record 1 has an empty or unreadable answer \(answer\)"):
        rows = [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": ""}]
        load_problems(write_jsonl(tmp_path / "hole.jsonl", rows))
    with pytest.raises(ValueError, match="needs a .boxed"):
        load_problems(write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "it is 3"}]))


def test_split_is_deterministic_disjoint_and_complete() -> None:
    problems = [{"problem": str(i), "answer": str(i)} for i in range(50)]
    train = split_problems(problems, "train", 0.2, seed=7)
    evaluation = split_problems(problems, "eval", 0.2, seed=7)
    assert len(evaluation) == 10 and len(train) == 40
    assert {p["problem"] for p in train}.isdisjoint(p["problem"] for p in evaluation)
    assert split_problems(problems, "eval", 0.2, seed=7) == evaluation
    assert split_problems(problems, "eval", 0.2, seed=8) != evaluation
    assert split_problems(problems, "all", 0.2, seed=7) == problems
    assert split_problems(problems, "train", 0.0, seed=7) == problems


def test_split_errors() -> None:
    problems = [{"problem": "p", "answer": "1"}] * 3
    with pytest.raises(ValueError, match="train, eval, all"):
        split_problems(problems, "test", 0.1, 0)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_problems(problems, "train", 1.0, 0)
    with pytest.raises(ValueError, match="'eval' split is empty"):
        split_problems(problems, "eval", 0.1, 0)
