"""The ALFWorld expert that acts only on what the memory prompt shows (`adapter: {memory: true}`).

Unlike the planner's walkthrough, which walks straight to hidden objects, this expert's every choice is a function
of the prompt a model sees (the task, "Holding:", the observation, the seek line, the admissible commands), so a
model shown only that prompt can imitate it: the zoo's ALFWorld teacher is trained on its episodes
(`opd_agents/zoo/demos.py`), and `python -m opd_agents.zoo diagnose` scores a model's agreement with it.
"""
from __future__ import annotations

from envs.alfworld.memory import Memory
from envs.alfworld.vocabulary import place_command


def memory_expert(memory: Memory, actions: list[str]) -> str | None:
    """The next command of the zoo's ALFWorld expert, a function of what the ``memory=True`` prompt shows.

    When the sought thing is here (the prompt's "Found X: ..." line): hands empty, take the object; holding it,
    heat/cool/clean it with the appliance, use the lamp, or at the goal receptacle open it if closed and move the
    object in (in the game's vocabulary: ``move X to Y`` or ``put X in/on Y``). Otherwise open this receptacle if
    the hands are empty and it is closed, else go to the next unvisited place the prompt lists (written last).
    Each choice reads one or two prompt lines (the task, "Holding:", the current observation, the seek line, the
    admissible commands), so ``history_length=0`` suffices and each decision is a short copy or match. Wins all 90
    default train and eval games in ≤ 20 steps.
    Returns None where it has no move (a task no template reads, or a command the engine does not offer).
    """
    goal, here, found = memory.goal, memory.location, memory.found
    if goal is None:
        return None
    if found is not None:
        if memory.holding is None:
            command = f"take {found} from {here}"
        elif goal.verb and not memory.changed:
            command = f"{goal.verb} {memory.holding} with {found}"
        elif memory.seeking == goal.toggle:
            command = f"use {found}"
        else:
            command = f"open {here}" if f"open {here}" in actions else place_command(memory.holding, here, actions)
        return command if command in actions else None
    if memory.holding is None and here and f"open {here}" in actions:
        return f"open {here}"
    return f"go to {memory.unvisited[0]}" if memory.unvisited else None
