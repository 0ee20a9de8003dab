"""Expert demonstrations for the zoo, rendered through the environments' own prompt adapters.

Owns turning each task's expert into :class:`~opd_agents.zoo.sft.Pair` s, in exactly the prompt format a rollout
shows the model (so a teacher trained on them is scored on the prompts it was trained on):

- math: the generated problems of the env's train split with their computed worked solutions
  (``opd/Math-v0``'s adapter renders the prompt; the solution is the response);
- ALFWorld: each train game played by :class:`SearchExpert`, an observation-only expert (it acts on what the
  prompt shows, never on hidden object positions, so a model that sees only the prompt can imitate it); every
  turn becomes (the adapter's per-turn prompt, ``<action>cmd</action>``), and only won games are kept.
  (The planner's walkthrough walks straight to hidden objects: a model trained on it collapses to one action.)
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alfworld.gen.constants as C

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


# ---- ALFWorld: an observation-only search expert ---------------------------------------------------------------
# Lower-case receptacle class -> the object classes it can hold (the generator places objects only where accepted).
_ACCEPTS = {r.lower(): frozenset(o.lower() for o in objs) for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
# State-change tasks: the appliance and the verb of its command ("heat apple 1 with microwave 1").
_CHANGE = {"pick_clean_then_place_in_recep": ("sinkbasin", "clean"),
           "pick_heat_then_place_in_recep": ("microwave", "heat"),
           "pick_cool_then_place_in_recep": ("fridge", "cool")}
_LAMP_STANDS = ("desk", "sidetable", "dresser")  # where a desk lamp stands (envs.alfworld.scenes.LAMP_STANDS)


def _kind(name: str) -> str:
    """A receptacle or object's class from its game name: "drawer 3" -> "drawer"."""
    return name.rsplit(" ", 1)[0]


class SearchExpert:
    """A reactive ALFWorld expert whose every choice is visible in the compact prompt, even with no history.

    Search: take the target object if it lies here (never from the goal receptacle: two-object tasks put the
    first one there), open this receptacle if it is closed, else go to the next receptacle, in the admissible
    list's order after the current one (wrapping), that can hold the object and is neither the goal receptacle
    nor the task's appliance. Holding it: go to the appliance and heat/cool/clean it; for "look" tasks use the
    desk lamp when it is here, else go to the next lamp stand; else go to the first goal receptacle, open it
    if closed, move the object into it. Where it is (the observation), what it holds (the admissible
    ``move``/``examine`` commands) and whether it has heated/cooled/cleaned (the observation right after) are
    all in the prompt, so ``history_length=0`` suffices. Goal classes come from the game's ``traj_data.json``
    (the same task the prompt states). Wins ~99% of generated train games within 20 steps.
    """

    def __init__(self, game_path: str) -> None:
        traj = json.loads((Path(game_path).parent / "traj_data.json").read_text())
        params = traj["pddl_params"]
        self.task_type = traj["task_type"]
        self.obj, self.recep = params["object_target"].lower(), params["parent_target"].lower()
        self.appliance, self.verb = _CHANGE.get(self.task_type, (None, None))
        self.loc: str | None = None
        self.holding: str | None = None
        self.changed = False

    def _next(self, actions: list[str], wanted: Any) -> str | None:
        places = sorted({a[len("go to "):] for a in actions if a.startswith("go to ")} | {self.loc} - {None},
                        key=lambda r: "go to " + r)
        if self.loc in places:
            i = places.index(self.loc)
            places = places[i + 1:] + places[:i]
        return next((f"go to {r}" for r in places if wanted(_kind(r))), None)

    def _first(self, actions: list[str], kind: str | None) -> str | None:
        return min((a for a in actions if a.startswith("go to ") and _kind(a[len("go to "):]) == kind), default=None)

    def act(self, actions: list[str]) -> str | None:
        """The next command given the admissible commands (None if the expert is stuck)."""
        here = _kind(self.loc) if self.loc else None
        if self.holding is None:
            takes = [a for a in actions if re.fullmatch(rf"take {re.escape(self.obj)} \d+ from .+", a)]
            if takes and self.loc and here != self.recep:
                return takes[0]
            if self.loc and f"open {self.loc}" in actions:
                return f"open {self.loc}"
            return self._next(actions, lambda k: k not in (self.recep, self.appliance)
                              and self.obj in _ACCEPTS.get(k, ()))
        if self.verb and not self.changed:
            command = f"{self.verb} {self.holding} with {self.loc}"
            return command if here == self.appliance and command in actions else self._first(actions, self.appliance)
        if self.task_type == "look_at_obj_in_light":
            uses = [a for a in actions if a.startswith("use desklamp")]
            return uses[0] if uses else self._next(actions, lambda k: k in _LAMP_STANDS)
        if here == self.recep:
            return f"open {self.loc}" if f"open {self.loc}" in actions else f"move {self.holding} to {self.loc}"
        return self._first(actions, self.recep)

    def update(self, action: str) -> None:
        """Track the command just taken (location, held object, state change done)."""
        if action.startswith("go to "):
            self.loc = action[len("go to "):]
        elif action.startswith("take "):
            self.holding = action[len("take "):].split(" from ")[0]
        elif action.startswith("move "):
            self.holding = None
        elif self.verb and action.startswith(self.verb + " "):
            self.changed = True


def _play(env: Any, adapter: Any, game: int, detour: float, rng: random.Random) -> tuple[list[Pair], bool]:
    """One episode of ``game`` labelled by :class:`SearchExpert`; returns its pairs and whether it was won.

    With probability ``detour`` per step the episode takes a random ``go to``/``open`` command instead of the
    expert's (DAgger-style: the expert's label for that state is still recorded), so the states off the expert's
    own path, and the way back from them, are in the data too. Those two commands never change what the expert
    tracks beyond its location, so its later labels stay correct.
    """
    first_obs, first_info = env.reset(seed=game, options={"game": game})
    observation, info, history, pairs = first_obs, first_info, [], []
    expert = SearchExpert(env.game_files[game])
    done = False
    while not done:
        label = expert.act(info["admissible_commands"])
        if label is None or label not in info["admissible_commands"]:
            break
        pairs.append(Pair(tuple(adapter.turn_messages(first_obs, first_info, history, observation, info)),
                          action_response(label)))
        action = label
        if detour and rng.random() < detour:
            action = rng.choice([a for a in info["admissible_commands"] if a.startswith(("go to ", "open "))]
                                or [label])
        next_obs, _, terminated, truncated, next_info = env.step(action)
        expert.update(action)
        history.append(Turn(observation, info, action_response(action), action))
        observation, info, done = next_obs, next_info, terminated or truncated
    return pairs, bool(info["won"])


def alfworld_episodes(env_kwargs: dict[str, Any], limit: int | None = None, replays: int = 0,
                      detour: float = 0.3, seed: int = 0) -> Iterator[list[Pair]]:
    """Per train game, the (per-turn prompt, expert action) pairs of :class:`SearchExpert` playing it.

    The expert's own play is kept when it wins (about 99%: the rest are two-object tasks in big rooms that do not
    fit ``max_steps``); ``replays`` more plays of each game take random detours (see :func:`_play`) and are kept
    whole, won or not, since every label is the expert's. Replays are cheap (a replay's reset reuses the
    game's parsed PDDL; a step costs ~30 ms), far cheaper than generating more games.
    """
    env = alfworld_env("train", env_kwargs)
    adapter = env.prompt_adapter()
    rng = random.Random(seed)
    try:
        for game in range(len(env.game_files[:limit])):
            pairs, won = _play(env, adapter, game, 0.0, rng)
            if won:
                yield pairs
            for _ in range(replays):
                yield _play(env, adapter, game, detour, rng)[0]
    finally:
        env.close()


def corpus(pairs: list[Pair]) -> Iterator[str]:
    """Text for training the tokenizer: every message and response of the demonstrations."""
    for pair in pairs:
        for message in pair.messages:
            yield message["content"]
        yield pair.response
