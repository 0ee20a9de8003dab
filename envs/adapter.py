"""Prompt adapters: how a task's observations become chat messages and how model text becomes an action.

The rollout loop is task-agnostic: it asks the environment (``env.unwrapped.prompt_adapter()``) for an
adapter and calls only the methods below. Two sample modes exist (see DESIGN.md):

- conversation mode: ``initial_messages`` once, then after each step ``followup_message``; the assistant
  responses are appended verbatim, so the whole episode is one chat.
- per-turn mode: ``turn_messages`` renders a fresh prompt every turn, with the recent history inside it
  (the verl-agent style the paper uses for ALFWorld).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Turn:
    """One finished turn of an episode: what the model saw, said, and what the env made of it."""

    observation: str
    info: dict[str, Any]
    response: str
    action: str


@dataclass
class ParsedAction:
    """The action extracted from a model response; ``format_error`` marks a response that broke the format."""

    action: str
    format_error: bool = False
    details: dict[str, Any] = field(default_factory=dict)


class PromptAdapter:
    """Default adapter: the observation is the user message, the whole response is the action."""

    system_prompt: str | None = None

    def initial_messages(self, observation: str, info: dict[str, Any]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": observation}]

    def followup_message(self, observation: str, info: dict[str, Any]) -> dict[str, str]:
        return {"role": "user", "content": observation}

    def turn_messages(
        self, first_observation: str, first_info: dict[str, Any], history: list[Turn],
        observation: str, info: dict[str, Any],
    ) -> list[dict[str, str]]:
        """Per-turn prompt. Default: the conversation so far flattened into one chat."""
        messages = self.initial_messages(first_observation, first_info)
        for i, turn in enumerate(history):
            messages.append({"role": "assistant", "content": turn.response})
            nxt = history[i + 1].observation if i + 1 < len(history) else observation
            nxt_info = history[i + 1].info if i + 1 < len(history) else info
            messages.append(self.followup_message(nxt, nxt_info))
        return messages

    def parse_action(self, response: str, info: dict[str, Any]) -> ParsedAction:
        return ParsedAction(action=response)


def get_adapter(env: Any) -> PromptAdapter:
    """The env's own adapter if it defines ``prompt_adapter()``, else the default one."""
    make = getattr(getattr(env, "unwrapped", env), "prompt_adapter", None)
    return make() if callable(make) else PromptAdapter()
