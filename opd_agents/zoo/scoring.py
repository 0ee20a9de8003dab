"""Scoring the zoo's models: greedy play of the real envs, and per-decision agreement with the ALFWorld expert.

Owns :func:`greedy` (batched, left-padded chat completions), :func:`evaluate_math` and :func:`evaluate_alfworld`
(success rates on held-out problems / games, the numbers the build prints and its targets are checked on), and
:func:`alfworld_decision_accuracy` with :func:`decision_kind` (which kinds of decision an ALFWorld model has not
learned yet; ``python -m opd_agents.zoo diagnose``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from envs.adapter import Turn
from opd_agents.chat_templates import render_with_tokenizer
from opd_agents.zoo import demos

ALFWORLD_EVAL_SPLIT = "eval_in_distribution"


@torch.no_grad()
def greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict[str, str]]],
           max_new_tokens: int) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding (generation appends on the right)."""
    texts = [render_with_tokenizer(tokenizer, list(m), add_generation_prompt=True) for m in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_math(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, env_kwargs: dict[str, Any],
                  n: int, batch: int = 32, split: str = "eval", first: int = 0) -> float:
    """Success rate on ``n`` problems of the math env's ``split`` from index ``first`` on (one attempt each; the
    defaults: the first ``n`` of the eval split)."""
    env = demos.math_env(split, env_kwargs)
    adapter, wins = env.prompt_adapter(), 0
    indices = list(range(first, min(first + n, len(env.problems))))
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        resets = [env.reset(options={"index": i}) for i in chunk]
        responses = greedy(model, tokenizer, [adapter.initial_messages(o, i) for o, i in resets], 64)
        for index, response in zip(chunk, responses):
            env.reset(options={"index": index})
            wins += bool(env.step(response)[4]["success"])
    return wins / max(len(indices), 1)


@dataclass
class _Episode:
    env: Any
    first: tuple[str, dict[str, Any]]
    observation: str
    info: dict[str, Any]
    history: list[Turn] = field(default_factory=list)
    done: bool = False


def evaluate_alfworld(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, env_kwargs: dict[str, Any],
                      n: int, split: str = ALFWORLD_EVAL_SPLIT) -> float:
    """Success rate on the first ``n`` games of ``split``, played in lockstep (one batched generate per step)."""
    envs = [demos.alfworld_env(split, env_kwargs)]  # one env per game; the first also says how many games there are
    count = min(n, len(envs[0].game_files))
    envs += [demos.alfworld_env(split, env_kwargs) for _ in range(1, count)]
    episodes = []
    for game, env in enumerate(envs[:count]):
        observation, info = env.reset(seed=game, options={"game": game})
        episodes.append(_Episode(env, (observation, info), observation, info))
    adapter = envs[0].prompt_adapter()
    while active := [e for e in episodes if not e.done]:
        prompts = [adapter.turn_messages(*e.first, e.history, e.observation, e.info) for e in active]
        for episode, response in zip(active, greedy(model, tokenizer, prompts, 24)):
            action = adapter.parse_action(response, episode.info).action
            observation, _, terminated, truncated, info = episode.env.step(action)
            episode.history.append(Turn(episode.observation, episode.info, response, action))
            episode.observation, episode.info, episode.done = observation, info, terminated or truncated
    wins = sum(bool(e.info.get("won")) for e in episodes)
    for env in envs:
        env.close()
    return wins / max(count, 1)


def decision_kind(response: str, prompt: str) -> str:
    """The kind of an expert decision: its verb, with "go" split into searching for the task object (hands empty)
    and going somewhere with it (appliance, lamp, goal receptacle)."""
    verb = response.removeprefix("<action>").split(" ", 1)[0]
    if verb == "go":
        return "go-search" if "Holding: nothing" in prompt else "go-target"
    return verb


def alfworld_decision_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                               env_kwargs: dict[str, Any], n: int, split: str = ALFWORLD_EVAL_SPLIT,
                               batch: int = 32) -> dict[str, dict[str, int]]:
    """Greedy agreement with the zoo's expert at every state of the expert's own play of the first ``n`` games of
    ``split``: ``{kind: {"right": r, "total": t}}`` per :func:`decision_kind`, plus ``"all"``.

    Episode success needs nearly every decision right (80% over ~9 decisions needs ~97.5% each); this says which
    decisions a model has not learned yet.
    """
    env = demos.alfworld_env(split, env_kwargs)
    adapter = env.prompt_adapter()
    try:
        pairs = [p for game in range(min(n, len(env.game_files)))
                 for p in demos.play_expert(env, adapter, game)]
    finally:
        env.close()
    counts: dict[str, dict[str, int]] = {}
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        for pair, response in zip(chunk, greedy(model, tokenizer, [p.messages for p in chunk], 24)):
            for key in (decision_kind(pair.response, pair.messages[-1]["content"]), "all"):
                entry = counts.setdefault(key, {"right": 0, "total": 0})
                entry["right"] += response.strip() == pair.response
                entry["total"] += 1
    return counts
