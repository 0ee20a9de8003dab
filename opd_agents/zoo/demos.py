"""Expert demonstrations for the zoo, rendered through the environments' own prompt adapters.

Owns turning each task's expert into :class:`~opd_agents.zoo.sft.Pair` s, in exactly the prompt format a rollout
shows the model (so a teacher trained on them is scored on the prompts it was trained on):

- math: the generated problems of the env's train split with their computed worked solutions
  (``opd/Math-v0``'s adapter renders the prompt; the solution is the response);
- ALFWorld: each train game's walkthrough (the planner's plan, verified to win when the game was generated)
  replayed through the real env; every turn becomes (the adapter's per-turn prompt, ``<action>cmd</action>``).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from envs.adapter import Turn
from opd_agents.zoo.sft import Pair


def math_env(split: str, env_kwargs: dict[str, Any]) -> Any:
    from envs.math.env import MathEnv

    return MathEnv(split=split, **env_kwargs)


def alfworld_env(split: str, env_kwargs: dict[str, Any]) -> Any:
    from envs.alfworld.env import ALFWorldEnv

    # No expert during replay or evaluation: the planner replans every step (slow) and is not needed here.
    return ALFWorldEnv(split=split, expert=None, **env_kwargs)


def math_pairs(env_kwargs: dict[str, Any], limit: int | None = None) -> list[Pair]:
    """(prompt, worked solution) for the train split's problems, at most ``limit`` of them."""
    env = math_env("train", env_kwargs)
    adapter = env.prompt_adapter()
    pairs = []
    for index, problem in enumerate(env.problems[:limit]):
        info = {"index": index, "level": problem["level"], "attempt": 0, "max_attempts": env.max_attempts}
        messages = adapter.initial_messages(problem["problem"], info)
        pairs.append(Pair(tuple(messages), problem["solution"]))
    return pairs


def action_response(action: str) -> str:
    """The response format the zoo's ALFWorld models use: the action only, no reasoning (short and cheap)."""
    return f"<action>{action}</action>"


def _walkthrough(game_path: str) -> list[str]:
    with open(game_path) as handle:
        plan = json.load(handle).get("walkthrough")
    if not plan:
        raise ValueError(f"{game_path} has no walkthrough; ALFWorld demos need games built with a planner plan")
    return list(plan)


def alfworld_episodes(env_kwargs: dict[str, Any], limit: int | None = None) -> Iterator[list[Pair]]:
    """Per train game, the (per-turn prompt, expert action) pairs of its walkthrough, checked to win."""
    env = alfworld_env("train", env_kwargs)
    adapter = env.prompt_adapter()
    try:
        for game in range(len(env.game_files[:limit])):
            first_obs, first_info = env.reset(seed=game, options={"game": game})
            observation, info, history, pairs = first_obs, first_info, [], []
            for action in _walkthrough(env.game_files[game]):
                if action not in info["admissible_commands"]:
                    raise RuntimeError(f"walkthrough action {action!r} is not admissible in {env.game_files[game]}")
                messages = adapter.turn_messages(first_obs, first_info, history, observation, info)
                response = action_response(action)
                pairs.append(Pair(tuple(messages), response))
                next_obs, _, terminated, _, next_info = env.step(action)
                history.append(Turn(observation, info, response, action))
                observation, info = next_obs, next_info
                if terminated:
                    break
            if not info["won"]:
                raise RuntimeError(f"replaying the walkthrough of {env.game_files[game]} did not win the game")
            yield pairs
    finally:
        env.close()


def corpus(pairs: list[Pair]) -> Iterator[str]:
    """Text for training the tokenizer: every message and response of the demonstrations."""
    for pair in pairs:
        for message in pair.messages:
            yield message["content"]
        yield pair.response
