"""Problem sets for the math env: loading JSONL/JSON/Parquet files and deterministic train/eval splits.

Owns the file formats and column aliases; a problem is a dict ``{"problem", "answer", "solution", "level"}``
(``solution``/``level`` None when the file has none).

Accepted files: ``.jsonl``/``.ndjson`` (one JSON object per line), ``.json`` (a list of objects), ``.parquet``.
Accepted columns, first match wins:
- problem text: ``problem``, ``question``, ``prompt``. A ``prompt`` may be a chat (a list of ``{"role", "content"}``
  messages, as in DAPO-Math-17K): the last user message is used, and DAPO's fixed instruction wrapper
  ("Solve the following math problem step by step. ... Remember to put your answer on its own line after
  \"Answer:\".") is stripped, since the env's prompt adapter states its own answer format.
- reference answer: ``answer``, ``ground_truth``, ``reward_model.ground_truth`` (DAPO's nested column),
  ``solution``. A value containing ``\\boxed{}`` (e.g. a MATH worked solution) contributes its last boxed content;
  a GSM8K-style ``... #### 72`` contributes what follows ``####``; numbers are turned into strings.
- optional: ``solution`` (kept for reference), ``level``.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envs.math.answers import last_boxed

PROBLEM_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "ground_truth", "reward_model.ground_truth", "solution")
SPLITS = ("train", "eval", "all")
_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")

_DAPO_HEAD = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_TAIL = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


def _read_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        rows = json.loads(text) if text.strip() else []
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json problem file must hold a list of objects; use .jsonl for one per line")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
    return rows


def _lookup(row: dict, key: str) -> Any:
    """``row[key]``, where a dotted key reaches into a nested dict; None when absent."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _problem_text(value: Any) -> str | None:
    if isinstance(value, list):  # a chat: the last user message (or the last message) is the problem
        messages = [m for m in value if isinstance(m, dict)]
        users = [m for m in messages if m.get("role") == "user"] or messages
        value = users[-1].get("content") if users else None
    if not isinstance(value, str):
        return None
    return _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", value.strip(), count=1)).strip() or None


def _answer_text(value: Any, boxed_only: bool) -> str | None:
    """The reference answer in ``value``; ``boxed_only`` (a worked-solution column) accepts only a boxed one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        return None
    if "\\boxed" in value or "\\fbox" in value:
        return last_boxed(value)
    if boxed_only:
        return None
    if "####" in value:
        value = value.rsplit("####", 1)[1]
    return value.strip() or None


def _first_key(rows: list[dict], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if _lookup(rows[0], key) is not None), None)


def load_problems(path: str | Path) -> list[dict]:
    """Problems from a local file; raises with the found and accepted column names when the format is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"math problem file {path} does not exist (data_path=...); give a local "
                                f"{'/'.join(_SUFFIXES)} file, or no data_path for the generated problem set")
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_SUFFIXES)}")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} contains no problems (empty file)")
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: every record must be a JSON object / table row with named columns")
    problem_key, answer_key = _first_key(rows, PROBLEM_KEYS), _first_key(rows, ANSWER_KEYS)
    if problem_key is None or answer_key is None:
        missing = "problem" if problem_key is None else "answer"
        accepted = PROBLEM_KEYS if problem_key is None else ANSWER_KEYS
        raise ValueError(f"{path}: no {missing} column; found columns {sorted(rows[0])}, accepted names: "
                         f"{', '.join(accepted)}. Rename the column in the file.")
    problems = []
    for index, row in enumerate(rows):
        problem = _problem_text(_lookup(row, problem_key))
        answer = _answer_text(_lookup(row, answer_key), boxed_only=answer_key == "solution")
        if problem is None:
            raise ValueError(f"{path}: record {index} has an empty or unreadable problem ({problem_key}); "
                             "fix or drop that record")
        if answer is None:
            hint = ", a solution needs a \\boxed{} answer" if answer_key == "solution" else ""
            raise ValueError(f"{path}: record {index} has an empty or unreadable answer ({answer_key}{hint}); "
                             "fix or drop that record")
        solution = row.get("solution")
        problems.append({
            "problem": problem,
            "answer": answer,
            "solution": solution if isinstance(solution, str) else None,
            "level": row.get("level"),
        })
    return problems


def split_problems(problems: Sequence[dict], split: str, eval_fraction: float, seed: int) -> list[dict]:
    """The ``split`` part of ``problems``: a seeded shuffle picks ``round(eval_fraction * n)`` eval problems;
    both parts keep file order. ``"all"`` returns everything."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if split == "all":
        return list(problems)
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[: round(eval_fraction * len(problems))])
    chosen = [p for i, p in enumerate(problems) if (i in eval_indices) == (split == "eval")]
    if not chosen:
        raise ValueError(f"the {split!r} split is empty ({len(problems)} problems, eval_fraction={eval_fraction}); "
                         "change eval_fraction, or use split='all' for an evaluation-only file")
    return chosen
