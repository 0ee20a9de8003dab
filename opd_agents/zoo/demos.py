"""Expert demonstrations for the zoo, rendered through the environments' own prompt adapters.

Owns turning each task's expert into :class:`~opd_agents.zoo.sft.Pair` s, in exactly the prompt format a rollout
shows the model (so a teacher trained on them is scored on the prompts it was trained on):

- math: the generated problems of the env's train split with their computed worked solutions
  (``opd/Math-v0``'s adapter renders the prompt; the solution is the response);
- ALFWorld: each train game played by ``envs.alfworld.expert.memory_expert``, an expert that acts only on what the
  memory prompt shows (never on hidden object positions, so a model that sees only the prompt can imitate it); every
  turn becomes (the adapter's per-turn prompt, ``<action>cmd</action>``), and only won games are kept.
  (The planner's walkthrough walks straight to hidden objects: a model trained on it collapses to one action.)
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import alfworld.gen.goal_library as goal_library

from envs.adapter import Turn
from envs.alfworld.expert import memory_expert
from envs.alfworld.memory import ACCEPTS, Memory, kind, recall
from envs.alfworld.prompt import task_of
from envs.alfworld.scenes import PORTABLE as _PORTABLE_CLASSES
from opd_agents.zoo.processes import run_jobs
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


# ---- ALFWorld: the memory expert's episodes, relabelled --------------------------------------------------------
PORTABLE = frozenset(c.lower() for c in _PORTABLE_CLASSES)  # object classes a game can ask for (none sliced)


def _relabelled_task(memory: Memory, actions: list[str], rng: random.Random) -> str | None:
    """A counterfactual task for the same state (hindsight-style relabelling), or None if none fits.

    Hands empty: another object class, one in view here half the time (so taking it is the label), else one any
    receptacle of the room accepts (so the label is a search move). Holding: another goal receptacle of the room
    that accepts the held object (not for "look" tasks, whose goal is the lamp). The task type, and so the
    sentence's template family, stays.
    """
    goal = memory.goal
    if goal is None:
        return None
    room = {kind(p) for p in memory.places}
    obj, recep = goal.obj, goal.recep
    if memory.holding is None:
        here = sorted({kind(a[len("take "):].split(" from ")[0]) for a in actions if a.startswith("take ")})
        anywhere = sorted(PORTABLE & set().union(*(ACCEPTS.get(r, ()) for r in room)))
        pool = here if here and rng.random() < 0.5 else anywhere
        if not pool:
            return None
        obj = rng.choice(pool)
    elif goal.toggle is None:
        held = kind(memory.holding)
        choices = sorted(r for r in room if held in ACCEPTS.get(r, ()) and r != goal.recep
                         and r != goal.appliance)
        if not choices:
            return None
        recep = rng.choice(choices)
    else:
        return None
    template = rng.choice(goal_library.gdict[goal.task_type]["templates"])
    return template.format(obj=obj, recep=recep, toggle=goal.toggle)


def _relabel(adapter: Any, state: tuple[str, dict[str, Any], list[Turn], str, dict[str, Any]], task: str,
             memory: Memory, rng: random.Random) -> Pair | None:
    first_obs, first_info, history, observation, info = state
    new_task = _relabelled_task(memory, info["admissible_commands"], rng)
    if new_task is None:
        return None
    first_obs = first_obs.replace(f"Your task is to: {task}", f"Your task is to: {new_task}")
    observation = first_obs if not history else observation
    label = memory_expert(recall(first_obs, first_info, history, observation, info, new_task),
                          info["admissible_commands"])
    if label is None or label not in info["admissible_commands"]:
        return None
    first_info = {**first_info, "task": new_task}
    return Pair(tuple(adapter.turn_messages(first_obs, first_info, history, observation, info)),
                action_response(label))


def _play(env: Any, adapter: Any, game: int, detour: float, rng: random.Random,
          relabels: int = 0) -> tuple[list[Pair], bool]:
    """One episode of ``game`` labelled by ``memory_expert``; returns its pairs and whether it was won.

    With probability ``detour`` per step the episode takes a random ``go to``/``open`` command instead of the
    expert's (DAgger-style: the expert's label for that state is still recorded), so the states off the expert's
    own path, and the way back from them, are in the data too. ``relabels`` more pairs per state ask what the
    expert would do there under another task (:func:`_relabelled_task`): without them a tiny model partly
    memorises each room's search order and object places instead of reading the prompt (after ~650 SFT steps:
    44% per-decision accuracy on eval games vs 63% on train games; with 3 relabels 35% on both).
    """
    first_obs, first_info = env.reset(seed=game, options={"game": game})
    observation, info, history, pairs = first_obs, first_info, [], []
    task = task_of(first_obs, first_info)
    done = False
    while not done:
        memory = recall(first_obs, first_info, history, observation, info, task)
        label = memory_expert(memory, info["admissible_commands"])
        if label is None or label not in info["admissible_commands"]:
            break
        pairs.append(Pair(tuple(adapter.turn_messages(first_obs, first_info, history, observation, info)),
                          action_response(label)))
        for _ in range(relabels):
            extra = _relabel(adapter, (first_obs, first_info, history, observation, info), task, memory, rng)
            if extra is not None:
                pairs.append(extra)
        action = label
        if detour and rng.random() < detour:
            action = rng.choice([a for a in info["admissible_commands"] if a.startswith(("go to ", "open "))]
                                or [label])
        next_obs, _, terminated, truncated, next_info = env.step(action)
        history.append(Turn(observation, info, action_response(action), action))
        observation, info, done = next_obs, next_info, terminated or truncated
    return pairs, bool(info["won"])


def play_expert(env: Any, adapter: Any, game: int) -> list[Pair]:
    """The expert's own play of ``game`` (no detours, no relabels): its (prompt, action) pairs."""
    return _play(env, adapter, game, 0.0, random.Random(0))[0]


def _episodes_of(env_kwargs: dict[str, Any], games: Sequence[int], replays: int, detour: float, seed: int,
                 relabels: int) -> list[list[Pair]]:
    env = alfworld_env("train", env_kwargs)
    adapter = env.prompt_adapter()
    episodes = []
    try:
        for game in games:
            rng = random.Random(f"{seed}/{game}")  # per game: the same pairs whichever worker plays it
            pairs, won = _play(env, adapter, game, 0.0, rng, relabels)
            if won:
                episodes.append(pairs)
            episodes += [_play(env, adapter, game, detour, rng, relabels)[0] for _ in range(replays)]
    finally:
        env.close()
    return episodes


def alfworld_episodes(env_kwargs: dict[str, Any], limit: int | None = None, replays: int = 0,
                      detour: float = 0.3, seed: int = 0, relabels: int = 0, workers: int = 1) -> list[list[Pair]]:
    """Per train game, the (per-turn prompt, expert action) pairs of ``memory_expert`` playing it.

    The expert's own play is kept when it wins (every default train game; a big room's two-object task may not
    fit a small ``max_steps``); ``replays`` more plays of each game take random detours (see :func:`_play`) and are kept
    whole, won or not, since every label is the expert's. Replays are cheap (a replay's reset reuses the
    game's parsed PDDL; a step costs ~30 ms), far cheaper than generating more games. ``workers`` > 1 plays
    contiguous slices of the games in that many processes (the result does not depend on it).
    """
    probe = alfworld_env("train", env_kwargs)  # generates the default games first if they are missing
    games = list(range(len(probe.game_files[:limit])))
    probe.close()
    if not games:
        return []
    size = -(-len(games) // max(1, min(workers, len(games))))
    jobs = [(_episodes_of, (env_kwargs, games[i:i + size], replays, detour, seed, relabels))
            for i in range(0, len(games), size)]
    return [episode for part in run_jobs(jobs, workers, "ALFWorld demonstrations") for episode in part]


def corpus(pairs: list[Pair]) -> Iterator[str]:
    """Text for training the tokenizer: every message and response of the demonstrations."""
    for pair in pairs:
        for message in pair.messages:
            yield message["content"]
        yield pair.response
