"""ALFWorld's prompt adapter: observations → chat messages, model text → an admissible command.

The full prompt follows verl-agent's ALFWorld template (the paper's code): task, step count, the last
``history_length`` observation/action pairs, the current observation, the admissible actions, and the
``<think>``/``<action>`` answer format. ``compact=True`` keeps the same content without the boilerplate, for
tiny models with short contexts. ``think=False`` asks for ``<action>`` only; ``require_think=True`` marks an
answer without a ``<think>`` block as a format error. ``memory=True`` adds the agent's state recalled from the
whole episode (what it holds; what it seeks, and whether it is here or where it may be;
:mod:`envs.alfworld.memory`) to per-turn prompts, so a model shown no history still knows where it has been.
``list_actions=False`` leaves the admissible commands out (with the memory lines, everything a command names is in
the prompt already; it halves the zoo's prompts); an answer is still checked against them.

``parse_action`` never raises: it takes the last ``<action>…</action>``; without one (missing or unbalanced
tags) it falls back to the text after the last ``<action>`` or the last non-empty line, sets
``format_error=True`` and snaps that text to the most similar admissible command (difflib). All scanning is
linear-time (``rfind``), so a 100 kB answer full of tags costs nothing.
"""
from __future__ import annotations

import difflib
import re
import string
from typing import Any

from envs.adapter import ParsedAction, PromptAdapter, Turn
from envs.alfworld.memory import recall

MAX_ACTION_CHARS = 200
_PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_TAG = re.compile(r"</?[A-Za-z_]{1,20}>")  # bounded: linear-time on any input
HIDDEN_COMMANDS = ("help",)  # verl-agent drops "help" from the actions it shows the model
SEARCH_LINE = "Unvisited places"  # starts the memory prompt's seek line while searching
FOUND_LINE = "Found"  # starts it when the sought thing is here

ANSWER_THINK = ("Now it's your turn to take an action.\nYou should first reason step-by-step about the current "
                "situation. This reasoning process MUST be enclosed within <think> </think> tags.\nOnce you've "
                "finished your reasoning, you should choose an admissible action for current step and present it "
                "within <action> </action> tags.")
ANSWER_PLAIN = ("Now it's your turn to take an action.\nChoose an admissible action for current step and present it "
                "within <action> </action> tags.")


def task_of(observation: str, info: dict[str, Any]) -> str:
    """The task sentence: from ``info["task"]`` or the "Your task is to:" line of the first observation."""
    if info.get("task"):
        return str(info["task"])
    _, _, rest = observation.partition("Your task is to:")
    return rest.strip().rstrip(".") if rest else ""


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _clean(text: str) -> str:
    kept = "".join(ch if ch in _PRINTABLE else " " for ch in text[: MAX_ACTION_CHARS * 4])
    return " ".join(kept.split())[:MAX_ACTION_CHARS]


def _between_last(text: str, low: str, open_tag: str, close_tag: str) -> str | None:
    end = low.rfind(close_tag)
    if end < 0:
        return None
    start = low.rfind(open_tag, 0, end)
    return None if start < 0 else text[start + len(open_tag): end]


class ALFWorldPromptAdapter(PromptAdapter):
    """verl-agent-style ALFWorld prompts and ``<action>`` parsing; see the module docstring for the options."""

    def __init__(self, history_length: int = 2, compact: bool = False, think: bool = True,
                 require_think: bool = False, memory: bool = False, list_actions: bool = True) -> None:
        if history_length < 0:
            raise ValueError(f"history_length must be >= 0, got {history_length}")
        self.history_length = history_length
        self.compact = compact
        self.think = think
        self.require_think = require_think
        self.memory = memory
        self.list_actions = list_actions

    # ---- rendering -------------------------------------------------------------------------------------
    def _actions(self, info: dict[str, Any]) -> list[str]:
        return [a for a in info.get("admissible_commands", []) if a not in HIDDEN_COMMANDS]

    def _admissible(self, actions: list[str]) -> str:
        """The full template's action sentence and the blank line after it ("" without ``list_actions``)."""
        if not self.list_actions:
            return ""
        listed = "\n ".join(f"'{a}'," for a in actions)
        return f"Your admissible actions of the current situation are: [{listed}].\n"

    def _answer(self) -> str:
        if self.compact:
            return ("Answer: <think>brief reasoning</think><action>one admissible action</action>" if self.think
                    else "Answer: <action>one admissible action</action>")
        return ANSWER_THINK if self.think else ANSWER_PLAIN

    def _memory_lines(self, task: str, first_observation: str, first_info: dict[str, Any], history: list[Turn],
                      observation: str, info: dict[str, Any]) -> tuple[str, str | None]:
        """("Holding: ...", the seek line or None).

        The seek line says what the agent looks for now: "Found X: <it>" when it is here (an object in view: "at
        <place>"), else "Unvisited places for X (next last): ...". It is written last, right before the answer
        format, at a fixed distance from the answer, which a tiny model learns to copy ~3x sooner than the first
        item of a list of varying length (per-decision accuracy of the zoo's search moves after 600 SFT steps:
        64% vs 20%).
        """
        memory = recall(first_observation, first_info, history, observation, info, task)
        seek = None
        if memory.found:
            where = f" at {memory.location}" if memory.holding is None else ""
            seek = f"{FOUND_LINE} {memory.seeking}: {memory.found}{where}"
        elif memory.unvisited:
            target = f" for {memory.seeking}" if memory.seeking else ""
            seek = f"{SEARCH_LINE}{target} (next last): " + ", ".join(reversed(memory.unvisited))
        return f"Holding: {memory.holding_text()}", seek

    def _prompt(self, task: str, history: list[Turn], observation: str, info: dict[str, Any],
                memory: tuple[str, str | None] | None = None) -> str:
        recent = history[-self.history_length:] if self.history_length else []
        first = len(history) - len(recent) + 1
        actions = self._actions(info)
        holding, seek = memory or (None, None)
        if self.compact:
            lines = [f"Task: {task}"]
            lines += [f"Step {first + i}: {t.observation} > {t.action}" for i, t in enumerate(recent)]
            lines.append(f"Now (step {len(history) + 1}): {observation}")
            lines += ["Actions: " + " | ".join(actions)] if self.list_actions else []
            # The memory lines last, at a fixed distance from the answer, which copies from them.
            lines += [line for line in (holding, seek) if line] + [self._answer()]
            return "\n".join(lines)
        if memory:
            observation = "\n".join(line for line in (observation, holding, seek) if line)
        admissible = self._admissible(actions)
        if not history:
            return (f"You are an expert agent operating in the ALFRED Embodied Environment.\nYour current "
                    f"observation is: {observation}\n{admissible}\n{self._answer()}")
        past = "\n".join(f"[Observation {first + i}: '{t.observation}', Action {first + i}: '{t.action}']"
                         for i, t in enumerate(recent))
        return (f"You are an expert agent operating in the ALFRED Embodied Environment. Your task is to: {task}\n"
                f"Prior to this step, you have already taken {len(history)} step(s). Below are the most recent "
                f"{len(recent)} observations and the corresponding actions you took: {past}\nYou are now at step "
                f"{len(history) + 1} and your current observation is: {observation}\n{admissible}\n"
                f"{self._answer()}")

    def turn_messages(self, first_observation: str, first_info: dict[str, Any], history: list[Turn],
                      observation: str, info: dict[str, Any]) -> list[dict[str, str]]:
        task = task_of(first_observation, first_info)
        memory = self._memory_lines(task, first_observation, first_info, history, observation, info) \
            if self.memory else None
        return [{"role": "user", "content": self._prompt(task, history, observation, info, memory)}]

    def initial_messages(self, observation: str, info: dict[str, Any]) -> list[dict[str, str]]:
        return self.turn_messages(observation, info, [], observation, info)

    def followup_message(self, observation: str, info: dict[str, Any]) -> dict[str, str]:
        actions = self._actions(info)
        if self.compact:
            listed = "\nActions: " + " | ".join(actions) if self.list_actions else ""
            text = f"Now: {observation}{listed}\n{self._answer()}"
        else:
            text = f"Your current observation is: {observation}\n{self._admissible(actions)}\n{self._answer()}"
        return {"role": "user", "content": text}

    # ---- parsing ---------------------------------------------------------------------------------------
    def parse_action(self, response: str, info: dict[str, Any]) -> ParsedAction:
        text = response if isinstance(response, str) else str(response)
        # ASCII-only lowering keeps every index of `low` valid in `text` (str.lower() can change the length:
        # a dotted capital İ becomes two code points, which shifted the slice of the command).
        low = text.translate(_ASCII_LOWER)
        tagged = _between_last(text, low, "<action>", "</action>")
        format_error = tagged is None
        if tagged is None:
            start = low.rfind("<action>")
            window = MAX_ACTION_CHARS * 4
            rest = text[start + len("<action>"):][:window] if start >= 0 else text[-window:]
            lines = [ln for ln in _TAG.sub("\n", rest).splitlines() if ln.strip()]
            tagged = (lines[0] if start >= 0 else lines[-1]) if lines else ""
        if self.require_think and _between_last(text, low, "<think>", "</think>") is None:
            format_error = True
        candidate = _clean(tagged)
        actions = list(info.get("admissible_commands", []))
        by_norm = {_normalise(a): a for a in actions}
        details: dict[str, Any] = {"raw_action": candidate}
        if _normalise(candidate) in by_norm:
            return ParsedAction(by_norm[_normalise(candidate)], format_error, {**details, "valid": True})
        if format_error and actions:
            match = difflib.get_close_matches(_normalise(candidate), list(by_norm), n=1, cutoff=0.5)
            if match:
                return ParsedAction(by_norm[match[0]], True, {**details, "valid": True, "snapped": True})
        return ParsedAction(candidate, format_error, {**details, "valid": False})
