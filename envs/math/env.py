"""``opd/Math-v0``: a Gymnasium text environment that grades a model's math answer against a reference.

Owns the episode logic. Observation: the problem text (then feedback text on retries); action: the model's full
response (any string: characters outside the action space's charset are accepted; one longer than
``MAX_TEXT_LENGTH`` is graded ``too_long`` with feedback). Reward 1.0 on the step whose
final answer is equivalent to the reference (``grading.check_answer``), else 0.0; ``truncated`` is always False.

Episodes: single-turn by default (terminated after one step). With ``max_attempts > 1`` a wrong or missing answer
gets ``"Your answer X is incorrect. Try again."`` (or a format reminder) and the episode continues until a correct
answer or the last attempt. Step info: ``success``, ``answer`` (reference), ``extracted`` (the model's final
answer or None), ``format_error``, ``grade_status`` (one of ``grading.STATUSES``), ``attempt``, ``max_attempts``,
``index``, ``level``, ``subject`` (None where the data has none, e.g. GSM8K). Reset info has the same
``index``/``level``/``subject``/``attempt``/``max_attempts`` (not the answer); evaluation breaks success down by
``level`` and ``subject``.

Problem choice: ``reset(options={"index": i})`` picks problem ``i`` of the split (0 <= i < ``len(env.problems)``,
for full evaluation sweeps); otherwise a problem drawn from ``self.np_random`` (so ``reset(seed=s)`` repeats).

Kwargs:
- ``data_path``: None -> the generated problem set (``num_problems``, default 1000; ``levels``, default 1-4;
  ``generator_seed``); a file path (see ``data.py`` for formats and column names), split by ``eval_fraction``
  (default 0.1) with ``split_seed``; or ``{"train": path, "eval": path}``, where ``split`` picks the whole file.
- ``data_format``: the file layout, ``"auto"`` (default: column aliases), ``"gsm8k"``, ``"math500"``/``"math"`` or
  ``"dapo"`` (``data.DATA_FORMATS``; a named format checks the file's columns). Only with ``data_path``.
- ``split``: ``"train"`` (default), ``"eval"`` or ``"all"`` (e.g. AIME / MATH-500 as evaluation-only files).
- ``max_attempts`` (1), ``answer_format`` (``"boxed"``, ``"answer_line"``, ``"raw"``), ``grading_timeout`` (5.0 s,
  at most 600),
  ``system_prompt``/``instruction`` (prompt adapter overrides).
"""
from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium
from gymnasium import spaces

from envs.math.adapter import MathPromptAdapter, default_instruction
from envs.math.answers import ANSWER_FORMATS, MAX_TEXT_LENGTH, as_text, extract_answer
from envs.math.data import DATA_FORMATS, load_problems, split_problems
from envs.math.generator import LEVELS, generate_problems
from envs.math.grading import check_answer

# Printable ASCII (LaTeX needs only that) plus symbols common in real problem sets; real model output or data may
# still hold other characters, which the env accepts all the same.
CHARSET = string.printable + "°π×÷−±≤≥≠≈√∞·…–—‘’“”∠△αβγδθλμσφωΔΣΩ"
MAX_GRADING_TIMEOUT_S = 600.0
DEFAULT_NUM_PROBLEMS = 1_000
_SHOWN_ANSWER_CHARS = 100


def _load(
    data_path: str | Path | Mapping[str, str | Path] | None, split: str, eval_fraction: float, split_seed: int,
    num_problems: int | None, levels: Sequence[int] | None, generator_seed: int, data_format: str,
) -> list[dict]:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    if data_path is None:
        if data_format != "auto":
            raise ValueError(f"data_format={data_format!r} describes a data file, but no data_path is given; "
                             "add data_path, or drop data_format to use the generated problem set")
        generated = generate_problems(
            DEFAULT_NUM_PROBLEMS if num_problems is None else num_problems, generator_seed,
            LEVELS if levels is None else levels,
        )
        return split_problems(generated, split, eval_fraction, split_seed)
    if num_problems is not None or levels is not None:
        raise ValueError("num_problems and levels apply to the generated problem set only; "
                         "drop them, or drop data_path to use generated problems")
    if isinstance(data_path, Mapping):
        if split not in data_path:
            raise ValueError(f"data_path has files for splits {sorted(data_path)}, not for split={split!r}")
        return load_problems(data_path[split], data_format)
    return split_problems(load_problems(data_path, data_format), split, eval_fraction, split_seed)


class MathEnv(gymnasium.Env[str, str]):
    """Math answer verifier; see the module docstring for the observation, reward, info and kwargs."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        data_path: str | Path | Mapping[str, str | Path] | None = None,
        data_format: str = "auto",
        split: str = "train",
        eval_fraction: float = 0.1,
        split_seed: int = 0,
        num_problems: int | None = None,
        levels: Sequence[int] | None = None,
        generator_seed: int = 0,
        max_attempts: int = 1,
        answer_format: str = "boxed",
        grading_timeout: float = 5.0,
        system_prompt: str | None = None,
        instruction: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"opd/Math-v0 has no render modes, got render_mode={render_mode!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if isinstance(grading_timeout, bool) or not isinstance(grading_timeout, (int, float)) \
                or not 0 < grading_timeout <= MAX_GRADING_TIMEOUT_S:
            raise ValueError(f"grading_timeout must be a number of seconds in (0, {MAX_GRADING_TIMEOUT_S}], got "
                             f"{grading_timeout!r} (a grader that may run forever would hang the rollout worker)")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"unknown answer_format {answer_format!r}; choose one of {', '.join(ANSWER_FORMATS)}")
        self._instruction = default_instruction(answer_format) if instruction is None else instruction
        self.problems: tuple[dict, ...] = tuple(
            _load(data_path, split, eval_fraction, split_seed, num_problems, levels, generator_seed, data_format))
        self.max_attempts = max_attempts
        self.answer_format = answer_format
        self.grading_timeout = grading_timeout
        self._system_prompt = system_prompt
        self.observation_space = spaces.Text(max_length=MAX_TEXT_LENGTH, charset=CHARSET)
        self.action_space = spaces.Text(max_length=MAX_TEXT_LENGTH, charset=CHARSET)
        self._index: int | None = None
        self._attempt = 0
        self._done = True

    @property
    def num_items(self) -> int:
        """Distinct problems ``reset(options={"index": i})`` can pick (evaluation plays items 0..n-1)."""
        return len(self.problems)

    @property
    def item_strata(self) -> list[str]:
        """Each problem's subject and level where the rows carry them ("" otherwise), in item order: evaluation
        samples a subset stratified by it."""
        return [" / ".join(f"{key} {p[key]}" for key in ("subject", "level") if p.get(key) is not None)
                for p in self.problems]

    def prompt_adapter(self) -> MathPromptAdapter:
        return MathPromptAdapter(self._system_prompt, self._instruction, self.answer_format)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        index = (options or {}).get("index")
        if index is None:
            index = int(self.np_random.integers(len(self.problems)))
        elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.problems):
            raise ValueError(f"options['index'] must be an integer in [0, {len(self.problems)}), got {index!r}")
        self._index, self._attempt, self._done = index, 0, False
        return self.problems[index]["problem"], self._info()

    def _info(self) -> dict[str, Any]:
        problem = self.problems[self._index]
        return {"index": self._index, "level": problem["level"], "subject": problem.get("subject"),
                "attempt": self._attempt, "max_attempts": self.max_attempts}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._done:
            # Stepping a finished (or never started) episode is a caller bug; answer with text, as for bad actions.
            info = {"success": False, "error": "episode is over"}
            return "The episode is over; call reset() to start a new problem.", 0.0, True, False, info
        self._attempt += 1
        reference = self.problems[self._index]["answer"]
        response = as_text(action)
        if len(response) > MAX_TEXT_LENGTH:
            # Outside the action space: graded as no answer, with feedback that says why (never a crash).
            extracted, status = None, "too_long"
        else:
            extracted = extract_answer(response, self.answer_format)
            status = check_answer(extracted, reference, self.grading_timeout)
        success = status == "correct"
        self._done = success or self._attempt >= self.max_attempts
        info = self._info() | {"success": success, "answer": reference, "extracted": extracted,
                               "format_error": extracted is None, "grade_status": status}
        return self._feedback(extracted, success, status), float(success), self._done, False, info

    def _feedback(self, extracted: str | None, success: bool, status: str) -> str:
        if success:
            return "Correct."
        retry = "" if self._done else " Try again."
        if status == "too_long" and extracted is None:
            return f"Your response is longer than {MAX_TEXT_LENGTH} characters; give a shorter one.{retry}"
        if extracted is None:
            reminder = f" {self._instruction}" if self._instruction else ""
            return f"No final answer found.{reminder}{retry}"
        shown = extracted if len(extracted) <= _SHOWN_ANSWER_CHARS else extracted[:_SHOWN_ANSWER_CHARS] + "..."
        shown = "".join(char if char in CHARSET else "?" for char in shown)  # keep feedback inside the obs space
        return f"Your answer {shown} is incorrect.{retry}"
