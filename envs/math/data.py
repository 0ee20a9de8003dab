"""Problem sets for the math env: loading JSONL/JSON/Parquet files and deterministic train/eval splits.

Owns the file formats and column layouts; a problem is a dict ``{"problem", "answer", "solution", "level",
"subject", "unique_id"}`` (the last four None when the file has none).

Accepted files: ``.jsonl``/``.ndjson`` (one JSON object per line), ``.json`` (a list of objects), ``.parquet``.

``data_format`` (``DATA_FORMATS``) says which layout to expect:
- ``"auto"`` (default): column aliases, first match wins.
  - problem text: ``problem``, ``question``, ``prompt``. A ``prompt`` may be a chat (a list of ``{"role",
    "content"}`` messages, as in DAPO-Math-17K): the last user message is used, and DAPO's fixed instruction
    wrapper ("Solve the following math problem step by step. ... Remember to put your answer on its own line after
    \"Answer:\".") is stripped, since the env's prompt adapter states its own answer format.
  - reference answer: ``answer``, ``ground_truth``, ``reward_model.ground_truth`` (DAPO's nested column),
    ``solution``. A value containing ``\\boxed{}`` (e.g. a MATH worked solution) contributes its last boxed content;
    a GSM8K-style ``... #### 72`` contributes what follows ``####``; numbers are turned into strings.
  - optional: ``solution`` (kept for reference), ``level`` and ``subject`` (kept as they are).
- ``"gsm8k"`` (openai/grade-school-math): ``question`` and ``answer``, a worked solution ending in ``#### <final>``.
  The answer is the final, with thousands separators removed (``1,080`` -> ``1080``) as GSM8K's own grader does
  (math-verify accepts a model's ``1,080`` either way); ``solution`` is the whole worked answer. No level/subject.
- ``"math500"`` (MATH-500, HuggingFaceH4/MATH-500) or its alias ``"math"``: ``problem`` and ``answer``; ``solution``,
  ``level`` (an int 1-5; ``"Level 3"`` is read as 3), ``subject`` and ``unique_id`` are kept when present.
- ``"dapo"`` (DAPO-Math-17K): ``prompt`` (a chat, wrapper stripped as above) and ``reward_model.ground_truth``.
A named format whose columns are missing raises ``ValueError`` naming the missing column and the columns found.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from envs.math.answers import MAX_TEXT_LENGTH, last_boxed
from envs.math.grading import MAX_ANSWER_CHARS
from envs.user_files import (
    LIMIT_ENV,
    MIB,
    UserFileError,
    iter_jsonl,
    open_regular,
    parse_json,
    read_text,
    size_limit,
    validate,
)

PROBLEM_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "ground_truth", "reward_model.ground_truth", "solution")
DATA_FORMATS = ("auto", "gsm8k", "math500", "math", "dapo")
# Columns a named format requires (dotted names reach into nested dicts).
REQUIRED_COLUMNS = {"gsm8k": ("question", "answer"), "math500": ("problem", "answer"),
                    "math": ("problem", "answer"), "dapo": ("prompt", "reward_model.ground_truth")}
MATH_LEVELS = range(1, 6)
SPLITS = ("train", "eval", "all")
_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
DATA_MAX_BYTES = 512 * MIB
_WHAT = "math problem file"


class Problem(BaseModel):
    """One problem as the env uses it. The answer must be gradable: at most `MAX_ANSWER_CHARS` characters, the most a
    response's extracted answer may have (a longer reference could never be graded correct)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    problem: str = Field(min_length=1, max_length=MAX_TEXT_LENGTH)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    solution: str | None = None
    level: int | FiniteFloat | Annotated[str, Field(max_length=100)] | None = None
    subject: str | None = Field(None, max_length=200)
    unique_id: str | None = Field(None, max_length=500)

_DAPO_HEAD = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_TAIL = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LEVEL_TEXT = re.compile(r"(?:level\s*)?(\d+)", re.IGNORECASE)


def _parquet_rows(path: Path, limit: int) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path, limit, _WHAT) as handle:
        try:
            table = pq.ParquetFile(handle)
            unpacked = sum(table.metadata.row_group(i).total_byte_size for i in range(table.metadata.num_row_groups))
            if unpacked > limit:
                raise UserFileError(f"{_WHAT} {str(path)!r} unpacks to {unpacked / MIB:,.0f} MiB, over the "
                                    f"{limit / MIB:,.0f} MiB limit; split it, or raise ${LIMIT_ENV}")
            return table.read().to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise UserFileError(f"{_WHAT} {str(path)!r} is not a readable Parquet file ({str(exc)[:200]})") from None


def _read_rows(path: Path) -> list[Any]:
    """The file's records, read through `envs.user_files`: a regular file under `DATA_MAX_BYTES`, JSON errors named
    with their line, NaN/Infinity and deep nesting refused."""
    suffix = path.suffix.lower()
    limit = size_limit(DATA_MAX_BYTES)
    if suffix == ".parquet":
        return _parquet_rows(path, limit)
    if suffix == ".json":
        text = read_text(path, limit, _WHAT)
        rows = parse_json(text, path, _WHAT) if text.strip() else []
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json problem file must hold a list of objects; use .jsonl for one per line")
        return rows
    return [row for _, row in iter_jsonl(path, limit, _WHAT)]


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


def _answer_text(value: Any, boxed_only: bool = False) -> str | None:
    """The reference answer in ``value``; ``boxed_only`` (a worked-solution column) accepts only a boxed one."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not math.isfinite(value)):
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


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _problem(problem: str, answer: str, *, solution: str | None = None, level: Any = None,
             subject: str | None = None, unique_id: str | None = None) -> dict[str, Any]:
    return {"problem": problem, "answer": answer, "solution": solution, "level": level, "subject": subject,
            "unique_id": unique_id}


def _record_error(path: Path, index: int, what: str) -> ValueError:
    return ValueError(f"{path}: record {index} has {what}; fix or drop that record")


def _gsm8k(path: Path, index: int, row: dict) -> dict[str, Any]:
    problem, solution = _problem_text(row["question"]), _text(row["answer"])
    if problem is None:
        raise _record_error(path, index, "an empty or unreadable problem (question)")
    if solution is None or "####" not in solution:
        raise _record_error(path, index, "no GSM8K final answer: its 'answer' must end in '#### <final answer>'")
    final = solution.rsplit("####", 1)[1].strip()
    if _THOUSANDS.fullmatch(final):
        final = final.replace(",", "")
    if not final:
        raise _record_error(path, index, "an empty final answer after '####'")
    return _problem(problem, final, solution=solution)


def _math_level(path: Path, index: int, value: Any) -> int | None:
    """MATH's difficulty 1-5 from an int or ``"Level N"``; None when absent or unrated (``"Level ?"``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "level ?", "?")):
        return None
    match = _LEVEL_TEXT.fullmatch(value.strip()) if isinstance(value, str) else None
    level = int(match.group(1)) if match else value
    if isinstance(level, bool) or not isinstance(level, int) or level not in MATH_LEVELS:
        raise _record_error(path, index, f"level {value!r}, not a MATH level 1-5 (an int or 'Level N')")
    return level


def _math500(path: Path, index: int, row: dict) -> dict[str, Any]:
    problem, answer = _problem_text(row["problem"]), _answer_text(row["answer"])
    if problem is None:
        raise _record_error(path, index, "an empty or unreadable problem (problem)")
    if answer is None:
        raise _record_error(path, index, "an empty or unreadable answer (answer)")
    unique_id = row.get("unique_id")
    return _problem(problem, answer, solution=_text(row.get("solution")),
                    level=_math_level(path, index, row.get("level")), subject=_text(row.get("subject")),
                    unique_id=None if unique_id is None else str(unique_id))


def _dapo(path: Path, index: int, row: dict) -> dict[str, Any]:
    problem = _problem_text(row["prompt"])
    answer = _answer_text(_lookup(row, "reward_model.ground_truth"))
    if problem is None:
        raise _record_error(path, index, "an empty or unreadable problem (prompt)")
    if answer is None:
        raise _record_error(path, index, "an empty or unreadable answer (reward_model.ground_truth)")
    return _problem(problem, answer)


_PARSERS: dict[str, Callable[[Path, int, dict], dict[str, Any]]] = {
    "gsm8k": _gsm8k, "math500": _math500, "math": _math500, "dapo": _dapo,
}


def _first_key(rows: list[dict], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if _lookup(rows[0], key) is not None), None)


def _auto(path: Path, rows: list[dict]) -> list[dict[str, Any]]:
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
            raise _record_error(path, index, f"an empty or unreadable problem ({problem_key})")
        if answer is None:
            hint = ", a solution needs a \\boxed{} answer" if answer_key == "solution" else ""
            raise _record_error(path, index, f"an empty or unreadable answer ({answer_key}{hint})")
        problems.append(_problem(problem, answer, solution=_text(row.get("solution")), level=row.get("level"),
                                 subject=_text(row.get("subject"))))
    return problems


def _named(path: Path, rows: list[dict], data_format: str) -> list[dict[str, Any]]:
    problems = []
    for index, row in enumerate(rows):
        missing = [key for key in REQUIRED_COLUMNS[data_format] if _lookup(row, key) is None]
        if missing:
            where = "" if index == 0 else f" (record {index})"
            raise ValueError(
                f"{path}: data_format={data_format!r} needs column {missing[0]!r}, but it is missing{where}; found "
                f"columns {sorted(row)}. Use the data_format that matches the file "
                f"({', '.join(DATA_FORMATS)}) or rename the column.")
        problems.append(_PARSERS[data_format](path, index, row))
    return problems


def load_problems(path: str | Path, data_format: str = "auto") -> list[dict[str, Any]]:
    """Problems from a local file in ``data_format`` (see the module docstring); raises ``ValueError`` naming the
    found and expected column names when the file does not match."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"math problem file {path} does not exist (data_path=...); give a local "
                                f"{'/'.join(_SUFFIXES)} file, or no data_path for the generated problem set")
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_SUFFIXES)}")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} contains no problems (empty file)")
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: every record must be a JSON object / table row with named columns")
    problems = _auto(path, rows) if data_format == "auto" else _named(path, rows, data_format)
    return [validate(Problem, p, path, _WHAT, f"record {i}").model_dump() for i, p in enumerate(problems)]


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
