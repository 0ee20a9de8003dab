"""Shared rollout-test helpers: a tiny multi-turn text env ("guess the number") with its prompt adapter,
and in-memory student policies with controllable logits.

Importing this module registers `opd-test/Guess-v0`; rollout workers (also Ray actors) import it via
`imports=["tests.rollout.test_toyenv"]`. Env kwargs: `high` (numbers 1..high), `step_delay` (seconds per
step, to keep a request in flight), `crash` (the process exits on step: a dying rollout worker).
"""
from __future__ import annotations

import os
import re
import string
import time
from typing import Any

import gymnasium
import torch
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env
from transformers import AutoModelForCausalLM

from envs.adapter import ParsedAction, PromptAdapter, Turn, get_adapter
from opd_agents.rollout.hf_policy import HFPolicy

ENV_ID = "opd-test/Guess-v0"
_ACTION = re.compile(r"<action>(.*?)</action>", re.S)


class GuessAdapter(PromptAdapter):
    system_prompt = "You play guess the number. Answer with <action>N</action>."

    def turn_messages(self, first_observation: str, first_info: dict[str, Any], history: list[Turn],
                      observation: str, info: dict[str, Any]) -> list[dict[str, str]]:
        # verl-agent style: one fresh user message holding the task and a summary of past turns.
        past = "".join(f"\nYou guessed {t.action!r}." for t in history)
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": f"{first_observation}{past}\n{observation}"}]

    def parse_action(self, response: str, info: dict[str, Any]) -> ParsedAction:
        m = _ACTION.search(response)
        return ParsedAction(m.group(1).strip(), False) if m else ParsedAction(response[:20], True)


class GuessEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, high: int = 9, step_delay: float = 0.0, crash: bool = False) -> None:
        charset = string.printable
        self.observation_space = spaces.Text(max_length=4096, charset=charset)
        self.action_space = spaces.Text(max_length=4096, charset=charset)
        self.high, self.step_delay, self.crash = high, step_delay, crash
        self.target, self.puzzle, self.steps = 1, 0, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self.puzzle = int(self.np_random.integers(10**6))
        if options and "index" in options:
            self.target = int(options["index"]) % self.high + 1
        else:
            self.target = int(self.np_random.integers(1, self.high + 1))
        self.steps = 0
        return f"Puzzle {self.puzzle}: guess my number between 1 and {self.high}.", {"task_type": "guess"}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.crash:
            os._exit(1)
        time.sleep(self.step_delay)
        self.steps += 1
        guess = int(action) if action.strip().isdigit() else None
        won = guess == self.target
        if guess is None:
            obs = "That is not a number. Try again."
        else:
            obs = "Correct!" if won else ("Higher." if guess < self.target else "Lower.")
        info = {"task_type": "guess", "success": won, "target": self.target, "steps": self.steps}
        return obs, float(won), won, False, info

    def prompt_adapter(self) -> GuessAdapter:
        return GuessAdapter()


def sharp_model(path, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """The tiny student with its matrices re-drawn at a larger scale: a freshly initialised tiny model just
    repeats its last input token greedily; this one produces varied continuations."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std, generator=gen)
    return model


def add_logit_bias(model: torch.nn.Module, token_id: int, bias: float, scale: float = 1.0):
    """Logits → scale · logits, then + bias on one token, at every position (a forward hook on lm_head)."""
    def hook(_module, _inputs, logits):
        logits = logits * scale
        logits[..., token_id] += bias
        return logits
    return model.lm_head.register_forward_hook(hook)


def make_policy(path, tokenizer, *, eos_bias: float | None = None, seed: int = 0) -> HFPolicy:
    model = sharp_model(path)
    if eos_bias is not None:
        add_logit_bias(model, tokenizer.eos_token_id, eos_bias)
    return HFPolicy(model, tokenizer, seed=seed)


if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point=f"{__name__}:GuessEnv", max_episode_steps=50)


def test_guess_env_passes_checker_and_has_adapter():
    env = gymnasium.make(ENV_ID)
    check_env(env.unwrapped, skip_render_check=True)
    assert isinstance(get_adapter(env), GuessAdapter)
    obs, _ = env.reset(seed=3, options={"index": 4})
    assert env.unwrapped.target == 5 and obs.startswith("Puzzle")
    assert env.step("5")[1:4] == (1.0, True, False)


def test_guess_adapter_parses_actions():
    adapter = GuessAdapter()
    assert adapter.parse_action("I think <action> 7 </action>", {}) == ParsedAction("7", False)
    assert adapter.parse_action("no tags", {}).format_error
