"""The ALFWorld agent memory (task parsing, state recalled from history) and the adapter's ``memory=True`` lines."""
from __future__ import annotations

import alfworld.gen.goal_library as goal_library
import pytest

from envs.adapter import Turn
from envs.alfworld.catalog import TASK_TYPES
from envs.alfworld.memory import Goal, parse_goal, recall
from envs.alfworld.prompt import ALFWorldPromptAdapter

PLACES = ["diningtable 10", "diningtable 2", "countertop 1", "fridge 1", "microwave 1", "sinkbasin 1", "drawer 1",
          "garbagecan 1"]
FIRST_INFO = {"admissible_commands": [f"go to {p}" for p in PLACES] + ["inventory", "look"]}
FIRST = "You are in the middle of a room.\n\nYour task is to: heat some apple and put it in countertop."
TASK = "heat some apple and put it in countertop"


def _run(steps: list[tuple[str, str]], task: str = TASK):
    """``steps``: (action, the observation it produced); returns recall() after the last one."""
    history, observation = [], FIRST
    for action, outcome in steps:
        history.append(Turn(observation, FIRST_INFO, f"<action>{action}</action>", action))
        observation = outcome
    return recall(FIRST, FIRST_INFO, history, observation, FIRST_INFO, task)


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_every_template_of_the_supported_task_types_parses(task_type: str) -> None:
    for template in goal_library.gdict[task_type]["templates"]:
        goal = parse_goal(template.format(obj="apple", recep="countertop", toggle="desklamp") + ".")
        assert goal == Goal(task_type, "apple", None if "{recep}" not in template else "countertop",
                            "desklamp" if "{toggle}" in template else None)


def test_unknown_sentence_has_no_goal_and_lists_every_unvisited_place() -> None:
    assert parse_goal("dance with the fridge") is None
    memory = _run([("go to fridge 1", "You arrive at fridge 1.")], task="dance with the fridge")
    assert memory.goal is None and memory.seeking is None
    assert memory.unvisited == ["countertop 1", "diningtable 2", "diningtable 10", "drawer 1", "garbagecan 1",
                                "microwave 1", "sinkbasin 1"]


def test_search_lists_unvisited_candidates_in_natural_order_and_skips_failed_moves() -> None:
    memory = _run([])
    assert memory.holding is None and memory.seeking == "apple"
    # ALFRED never puts an apple in a drawer; the goal (countertop) and the appliance (microwave) are not searched
    assert memory.unvisited == ["diningtable 2", "diningtable 10", "fridge 1", "garbagecan 1", "sinkbasin 1"]
    memory = _run([("go to diningtable 2", "You arrive at diningtable 2."), ("go to fridge 1", "Nothing happens.")])
    assert memory.location == "diningtable 2" and memory.visited == ["diningtable 2"]
    assert memory.unvisited == ["diningtable 10", "fridge 1", "garbagecan 1", "sinkbasin 1"]


def test_sweep_restarts_when_every_candidate_was_seen() -> None:
    first = _run([])
    memory = _run([(f"go to {p}", f"You arrive at {p}.") for p in first.unvisited])
    assert memory.unvisited == [p for p in first.unvisited if p != memory.location]


def test_take_change_and_move_update_what_is_held_and_what_is_sought() -> None:
    took = [("go to diningtable 2", "You arrive at diningtable 2."),
            ("take apple 1 from diningtable 2", "You pick up the apple 1 from the diningtable 2.")]
    memory = _run(took)
    assert (memory.holding, memory.changed, memory.seeking, memory.found) == ("apple 1", False, "microwave", None)
    assert memory.unvisited == ["microwave 1"] and memory.holding_text() == "apple 1"
    at_microwave = took + [("go to microwave 1", "You arrive at microwave 1.")]
    assert _run(at_microwave).found == "microwave 1" and _run(at_microwave).unvisited == []
    heated = at_microwave + [("heat apple 1 with microwave 1", "You heat the apple 1 using the microwave 1.")]
    memory = _run(heated)
    assert memory.holding_text() == "apple 1 (heated)"
    assert (memory.seeking, memory.found, memory.unvisited) == ("countertop", None, ["countertop 1"])
    assert _run(took + [("heat apple 1 with microwave 1", "Nothing happens.")]).changed is False
    arrived = heated + [("go to countertop 1", "You arrive at countertop 1.")]
    assert _run(arrived).found == "countertop 1"
    placed = _run(arrived + [("move apple 1 to countertop 1", "You move the apple 1 to the countertop 1.")])
    assert placed.holding is None and placed.seeking == "apple" and placed.visited == ["countertop 1"]


def test_an_object_of_the_sought_class_in_view_is_found_except_in_the_goal_receptacle() -> None:
    info = {"admissible_commands": FIRST_INFO["admissible_commands"] + [
        "take apple 3 from diningtable 2", "take bread 1 from diningtable 2"]}
    history = [Turn(FIRST, FIRST_INFO, "", "go to diningtable 2")]
    memory = recall(FIRST, FIRST_INFO, history, "You arrive at diningtable 2.", info, TASK)
    assert memory.found == "apple 3" and memory.unvisited == []
    history = [Turn(FIRST, FIRST_INFO, "", "go to countertop 1")]
    info = {"admissible_commands": ["take apple 3 from countertop 1"]}
    memory = recall(FIRST, FIRST_INFO, history, "You arrive at countertop 1.", info, TASK)
    assert memory.found is None and memory.unvisited[0] == "diningtable 2"


def test_look_tasks_search_lamp_stands_once_the_object_is_held() -> None:
    task = "look at apple under the desklamp"
    info = {"admissible_commands": [f"go to {p}" for p in ("desk 1", "sidetable 1", "bed 1", "drawer 1")]}
    history = [Turn("start", info, "", "go to desk 1"),
               Turn("You arrive at desk 1.", info, "", "take apple 1 from desk 1")]
    memory = recall("start", info, history, "You pick up the apple 1 from the desk 1.", info, task)
    assert memory.seeking == "desklamp" and memory.unvisited == ["sidetable 1"]
    history.append(Turn("You pick up the apple 1 from the desk 1.", info, "", "go to sidetable 1"))
    lit = {"admissible_commands": info["admissible_commands"] + ["use desklamp 1"]}
    assert recall("start", info, history, "You arrive at sidetable 1.", lit, task).found == "desklamp 1"


@pytest.mark.parametrize("compact", [True, False])
def test_adapter_renders_the_memory_lines_only_when_asked(compact: bool) -> None:
    history = [Turn(FIRST, FIRST_INFO, "", "go to diningtable 2")]
    args = (FIRST, FIRST_INFO, history, "You arrive at diningtable 2.", FIRST_INFO)
    with_memory = ALFWorldPromptAdapter(history_length=0, compact=compact, memory=True).turn_messages(*args)
    text = with_memory[0]["content"]
    assert "Holding: nothing" in text
    assert "Unvisited places for apple (next last): sinkbasin 1, garbagecan 1, fridge 1, diningtable 10" in text
    assert text.index("You arrive at diningtable 2.") < text.index("Unvisited places")
    if compact:  # the next place sits right before the answer format
        assert text.split("\n")[-2].endswith(", diningtable 10") and text.split("\n")[-1].startswith("Answer:")
    found = ALFWorldPromptAdapter(history_length=0, compact=compact, memory=True).turn_messages(
        *args[:4], {"admissible_commands": ["take apple 3 from diningtable 2"]})[0]["content"]
    assert "Found apple: apple 3 at diningtable 2" in found and "Unvisited" not in found
    plain = ALFWorldPromptAdapter(history_length=0, compact=compact).turn_messages(*args)[0]["content"]
    assert "Holding:" not in plain and "Unvisited" not in plain
    first = ALFWorldPromptAdapter(compact=compact, memory=True).initial_messages(FIRST, FIRST_INFO)[0]["content"]
    assert "fridge 1, diningtable 10, diningtable 2\n" in first
