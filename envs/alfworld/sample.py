"""Sampling one game: task type → room → target object and receptacle (or lamp) → object placements.

Follows ALFRED's task constraints (``alfworld.gen.game_states.task_game_state.get_filter_crit`` and
``constants.GOALS_VALID``): heat/cool/clean need a heatable/coolable/cleanable object and a microwave/fridge/sink,
the target receptacle is never that appliance, no target-class object starts where the goal wants it, "two
objects" tasks place at least two instances. The split decides the rooms (ALFRED's train or unseen test rooms)
and which (task, object, receptacle) combinations are allowed (:func:`catalog.is_held_out`). Every random choice
comes from the ``random.Random`` passed in, so a game is a pure function of its seed.
"""
from __future__ import annotations

import random

import alfworld.gen.constants as C

from envs.alfworld.catalog import is_held_out
from envs.alfworld.problem import GameSpec, PlacedObject, goal_templates, goal_text
from envs.alfworld.scenes import LAMP, LAMP_STANDS, Receptacle, Scene, load_scene, room_of, scene_numbers

# The appliance a state-change task uses and the object property it needs.
APPLIANCE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}


def _accepts(rtype: str, otype: str) -> bool:
    return otype in C.VAL_RECEPTACLE_OBJECTS.get(rtype, ())


def _scene_fits(scene: Scene, task_type: str) -> bool:
    if scene.room not in C.GOALS_VALID[task_type]:
        return False
    if task_type == "look_at_obj_in_light":
        return scene.has_lamp
    if task_type in APPLIANCE:
        return APPLIANCE[task_type][0] in scene.receptacle_types
    return True


def _candidates(scene: Scene, task_type: str, ood: bool) -> list[tuple[str, str]]:
    """(object class, receptacle or lamp class) pairs that make a valid task of this split in this room."""
    appliance, prop = APPLIANCE.get(task_type, (None, None))
    pairs = []
    for obj in scene.object_types:
        if prop and obj not in C.VAL_ACTION_OBJECTS[prop]:
            continue
        if task_type == "look_at_obj_in_light":
            targets = [LAMP]
        else:
            targets = [rt for rt in sorted(scene.receptacle_types) if rt != appliance and _accepts(rt, obj)]
        for target in targets:
            # The object must have somewhere to start that is not the goal receptacle (or the appliance).
            starts = [rt for rt in scene.receptacle_types if rt not in (target, appliance) and _accepts(rt, obj)]
            if starts and is_held_out(task_type, obj, target) == ood:
                pairs.append((obj, target))
    return pairs


def _pick_receptacles(rng: random.Random, scene: Scene, max_per_type: int) -> list[Receptacle]:
    """At most ``max_per_type`` instances of each receptacle class (keeps games small for tiny models)."""
    by_type: dict[str, list[Receptacle]] = {}
    for r in scene.receptacles:
        by_type.setdefault(r.rtype, []).append(r)
    chosen = []
    for rtype in sorted(by_type):
        group = by_type[rtype]
        chosen += rng.sample(group, min(max_per_type, len(group)))
    return sorted(chosen, key=lambda r: r.id)


def _object_id(rng: random.Random, otype: str, taken: set[str]) -> str:
    while True:
        x, y, z = (rng.uniform(-3.0, 3.0) for _ in range(3))
        oid = f"{otype}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"
        if oid not in taken:
            taken.add(oid)
            return oid


def sample_game(
    rng: random.Random, task_type: str, ood: bool, trial: str,
    max_per_type: int = 3, distractors: tuple[int, int] = (4, 8),
) -> GameSpec | None:
    """One game of ``task_type`` for the split (``ood``: unseen rooms + held-out combos); None if no room fits."""
    rooms = [n for n in scene_numbers(held_out=ood) if _scene_fits(load_scene(n), task_type)]
    rng.shuffle(rooms)
    for number in rooms:
        scene = load_scene(number)
        pairs = _candidates(scene, task_type, ood)
        if pairs:
            break
    else:
        return None
    obj, target = rng.choice(pairs)
    appliance = APPLIANCE.get(task_type, (None, None))[0]
    receptacles = _pick_receptacles(rng, scene, max_per_type)
    taken: set[str] = set()

    def place(otype: str, avoid: tuple[str | None, ...] = ()) -> PlacedObject:
        spots = [r for r in receptacles if _accepts(r.rtype, otype) and r.rtype not in avoid]
        return PlacedObject(_object_id(rng, otype, taken), otype, rng.choice(spots).id)

    low = 2 if task_type == "pick_two_obj_and_place" else 1
    objects = [place(obj, (target, appliance)) for _ in range(rng.randint(low, 3))]
    others = [t for t in scene.object_types if t != obj and any(_accepts(r.rtype, t) for r in receptacles)]
    for otype in rng.sample(others, min(len(others), rng.randint(*distractors))):
        objects += [place(otype) for _ in range(rng.randint(1, 2))]
    if scene.has_lamp:
        stands = [r for r in receptacles if r.rtype in LAMP_STANDS]
        objects.append(PlacedObject(_object_id(rng, LAMP, taken), LAMP, rng.choice(stands).id))

    toggle = LAMP if task_type == "look_at_obj_in_light" else ""
    parent = "" if toggle else target
    template = rng.choice(goal_templates(task_type))
    return GameSpec(
        task_type=task_type, object_target=obj, parent_target=parent, toggle_target=toggle,
        scene=number, room=room_of(number), receptacles=receptacles, objects=objects,
        goal_text=goal_text(template, obj, parent, toggle), trial=trial,
    )
