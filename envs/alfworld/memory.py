"""An ALFWorld agent's working memory, recalled from the episode so far: what it holds, where it has looked.

Owns :func:`recall`, a pure function of what a per-turn prompt already receives (first observation, the finished
turns, the current observation and admissible commands), and :func:`parse_goal`, which reads the task sentence
with ALFWorld's own task templates (``alfworld.gen.goal_library``). The prompt adapter's ``memory=True`` renders
the result as two short lines ("Holding: ...", then "Found X: ..." or "Unvisited places for X (next last): ..."),
so a model that sees one turn at a time still knows its state. Tiny models trained from scratch have neither a
long context nor common sense; the lines carry both: what the agent seeks now (the task object, the appliance,
the lamp, the goal receptacle), whether it is in view, and otherwise the places still worth visiting for it,
ordered and filtered by ALFRED's placement table (``VAL_RECEPTACLE_OBJECTS``: which receptacle classes can hold
an object class), the knowledge a pretrained LLM brings to ALFWorld.

An action counts only when it worked: the engine answers a failed command with "Nothing happens.". A placing
action counts in either vintage's phrasing (``move X to Y``, ``put X in/on Y``) and in the near-misses the env
translates (``put X in Y``; :mod:`envs.alfworld.vocabulary`).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import alfworld.gen.constants as C
import alfworld.gen.goal_library as goal_library

from envs.adapter import Turn
from envs.alfworld import scenes

# Lower-case receptacle class -> the object classes it can hold (the generator places objects only where accepted).
ACCEPTS = {r.lower(): frozenset(o.lower() for o in objs) for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
# State-change tasks: the appliance and the verb of its command ("heat apple 1 with microwave 1").
CHANGE = {"pick_clean_then_place_in_recep": ("sinkbasin", "clean"),
          "pick_heat_then_place_in_recep": ("microwave", "heat"),
          "pick_cool_then_place_in_recep": ("fridge", "cool")}
CHANGED_WORD = {"clean": "cleaned", "heat": "heated", "cool": "cooled"}
LAMP_STANDS = tuple(stand.lower() for stand in scenes.LAMP_STANDS)  # where a desk lamp stands
FAILED = "Nothing happens"
PLACING_VERBS = ("move ", "put ")  # alfworld >= 0.4 and pre-0.4 games


@dataclass(frozen=True)
class Goal:
    """A task sentence read with ALFWorld's templates: its type and the classes it names (lower case)."""

    task_type: str
    obj: str
    recep: str | None = None
    toggle: str | None = None

    @property
    def appliance(self) -> str | None:
        """The receptacle class that heats/cools/cleans the object in a state-change task, else None."""
        return CHANGE.get(self.task_type, (None, None))[0]

    @property
    def verb(self) -> str | None:
        """The command verb of a state-change task ("heat"), else None."""
        return CHANGE.get(self.task_type, (None, None))[1]


@functools.cache
def _templates() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for task_type, spec in goal_library.gdict.items():
        for template in spec["templates"]:
            pattern = re.escape(template)
            for slot in ("obj", "recep", "toggle", "mrecep"):
                pattern = pattern.replace(re.escape("{" + slot + "}"), rf"(?P<{slot}>\w+)")
            out.append((re.compile(pattern), task_type))
    return out


def parse_goal(task: str) -> Goal | None:
    """The goal of ``task`` ("put a clean apple in fridge"), or None for a sentence no template matches."""
    text = " ".join(task.lower().strip().rstrip(".").split())
    for pattern, task_type in _templates():
        if match := pattern.fullmatch(text):
            slots = match.groupdict()
            return Goal(task_type, slots["obj"], slots.get("recep"), slots.get("toggle"))
    return None


def kind(name: str) -> str:
    """A receptacle or object's class from its game name: "drawer 3" -> "drawer"."""
    return name.rsplit(" ", 1)[0]


def _natural(name: str) -> tuple[str, int]:
    head, _, number = name.rpartition(" ")
    return (head, int(number)) if number.isdigit() else (name, 0)


@dataclass
class Memory:
    """The agent's state after the finished turns.

    ``places``: every receptacle of the room in natural order ("cabinet 2" before "cabinet 10"); ``visited``: the
    ones reached since the last successful take or move (a new search starts there); ``seeking``: the class the
    agent looks for now — the task object while its hands are empty, then the appliance of a state-change task
    until the change is done, the toggle of a "look" task, else the goal receptacle; ``found``: the sought thing
    when it is here (an object of that class in view — never in the goal receptacle, where two-object tasks put
    the first one —, the lamp that can be used, or this place when it is of the sought receptacle class);
    ``unvisited``: otherwise the places still worth visiting for it, in ``places`` order — when every candidate
    has been seen, the sweep starts over (for a task no template reads: every place, while the hands are empty).
    """

    goal: Goal | None
    places: list[str]
    location: str | None = None
    holding: str | None = None
    changed: bool = False
    visited: list[str] = field(default_factory=list)
    seeking: str | None = None
    found: str | None = None
    unvisited: list[str] = field(default_factory=list)

    def holding_text(self) -> str:
        if self.holding is None:
            return "nothing"
        verb = self.goal.verb if self.goal else None
        return f"{self.holding} ({CHANGED_WORD[verb]})" if verb and self.changed else self.holding


def _places(first_info: dict[str, Any], history: Sequence[Turn]) -> list[str]:
    found = {a[len("go to "):] for a in first_info.get("admissible_commands", []) if a.startswith("go to ")}
    found |= {t.action[len("go to "):] for t in history if t.action.startswith("go to ")}
    return sorted(found, key=_natural)


def _seeking(goal: Goal, holding: str | None, changed: bool) -> str | None:
    if holding is None:
        return goal.obj
    if goal.verb and not changed:
        return goal.appliance
    return goal.toggle or goal.recep


def _candidates(goal: Goal | None, seeking: str | None, holding: bool, places: list[str]) -> list[str]:
    if goal is None or seeking is None:
        return places
    if holding:  # a lamp stands on one of a few furniture classes; the appliance / goal is its own class
        return [p for p in places if kind(p) in LAMP_STANDS] if seeking == goal.toggle else \
            [p for p in places if kind(p) == seeking]
    skip = {goal.recep, goal.appliance}
    return [p for p in places if kind(p) not in skip and seeking in ACCEPTS.get(kind(p), ())]


def _found(memory: Memory, actions: Sequence[str]) -> str | None:
    goal, here, seeking = memory.goal, memory.location, memory.seeking
    if goal is None or seeking is None or here is None:
        return None
    if memory.holding is None:
        if kind(here) == goal.recep:
            return None
        pattern = re.compile(rf"take ({re.escape(seeking)} \d+) from {re.escape(here)}")
        return next((m.group(1) for a in actions if (m := pattern.fullmatch(a))), None)
    if seeking == goal.toggle:
        return next((a[len("use "):] for a in actions if a.startswith(f"use {seeking} ")), None)
    return here if kind(here) == seeking else None


def recall(first_observation: str, first_info: dict[str, Any], history: Sequence[Turn], observation: str,
           info: dict[str, Any], task: str) -> Memory:
    """Replay ``history`` (the finished turns; each turn's outcome is the next turn's observation, the last one's is
    ``observation``) into a :class:`Memory` for the task sentence ``task``; ``info``'s admissible commands say
    what is in view now."""
    goal = parse_goal(task)
    memory = Memory(goal, _places(first_info, history))
    outcomes = [t.observation for t in history[1:]] + [observation]
    for turn, outcome in zip(history, outcomes):
        if outcome.startswith(FAILED):
            continue
        action = turn.action
        if action.startswith("go to "):
            memory.location = action[len("go to "):]
            memory.visited.append(memory.location)
        elif action.startswith("take "):
            memory.holding, memory.changed = action[len("take "):].split(" from ")[0], False
            memory.visited = [memory.location] if memory.location else []
        elif action.startswith(PLACING_VERBS):
            memory.holding, memory.changed = None, False
            memory.visited = [memory.location] if memory.location else []
        elif memory.holding and action.split(" ", 1)[0] in CHANGED_WORD:
            memory.changed = True
    if goal is not None:
        memory.seeking = _seeking(goal, memory.holding, memory.changed)
        memory.found = _found(memory, info.get("admissible_commands", []))
    if memory.found is None and (memory.seeking is not None or (goal is None and memory.holding is None)):
        candidates = _candidates(goal, memory.seeking, memory.holding is not None, memory.places)
        memory.unvisited = [p for p in candidates if p not in memory.visited] or \
            [p for p in candidates if p != memory.location]
    return memory
