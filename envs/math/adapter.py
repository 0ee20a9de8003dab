"""The math task's prompt adapter: problem -> chat messages, model response -> action (the full text).

Owns the prompt wording (short by default, for the tiny embedded models; ``system_prompt``/``instruction`` override
it) and the per-format answer instruction. The env does the grading; the adapter only reports whether the response
has a final answer in the expected format (``format_error``), so the rollout loop can log it.
"""
from __future__ import annotations

from typing import Any

from envs.adapter import ParsedAction, PromptAdapter
from envs.math.answers import ANSWER_FORMATS, MAX_TEXT_LENGTH, as_text, extract_answer

DEFAULT_SYSTEM_PROMPT = "Solve the math problem step by step."
INSTRUCTIONS = {
    "boxed": "Put your final answer within \\boxed{}.",
    "answer_line": "End with a line of the form Answer: <your answer>.",
    "raw": "Reply with the final answer only.",
}


def default_instruction(answer_format: str) -> str:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; choose one of {', '.join(ANSWER_FORMATS)}")
    return INSTRUCTIONS[answer_format]


class MathPromptAdapter(PromptAdapter):
    """System prompt, then ``<problem>\\n<instruction>`` as the user turn; retry feedback is a plain user turn.

    ``system_prompt=""`` drops the system message (e.g. for chat templates without a system role).
    """

    def __init__(
        self, system_prompt: str | None = None, instruction: str | None = None, answer_format: str = "boxed",
    ) -> None:
        self.answer_format = answer_format
        self.instruction = default_instruction(answer_format) if instruction is None else instruction
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else (system_prompt or None)

    def initial_messages(self, observation: str, info: dict[str, Any]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        user = f"{observation}\n{self.instruction}" if self.instruction else observation
        return messages + [{"role": "user", "content": user}]

    def parse_action(self, response: str, info: dict[str, Any]) -> ParsedAction:
        text = as_text(response)
        extracted = None if len(text) > MAX_TEXT_LENGTH else extract_answer(text, self.answer_format)
        return ParsedAction(action=text, format_error=extracted is None, details={"extracted": extracted})
