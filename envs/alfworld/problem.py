"""Writing one game's files in the official ALFWorld layout: ``initial_state.pddl``, ``traj_data.json``, grammar.

A :class:`GameSpec` (what the sampler decided: task, room, receptacles, object placements) becomes
- a PDDL problem for ``alfworld/data/alfred.pddl`` with the facts the domain's actions test (``receptacleType``,
  ``objectType``, ``openable``, ``pickupable``, ``canContain`` from ``constants.VAL_RECEPTACLE_OBJECTS``,
  ``cleanable``/``heatable``/``coolable``/``toggleable``/``sliceable`` from ``constants.VAL_ACTION_OBJECTS``,
  ``inReceptacle``, ``atLocation``/``receptacleAtLocation``/``objectAtLocation``) and the goal from ALFRED's goal
  library, with ids mangled exactly as ALFRED's ``PlannedGameState.fix_pddl_str_chars`` does;
- ``traj_data.json`` with the ``task_type``/``pddl_params`` that ALFWorld's handcoded expert and loaders read;
- the ``alfred.twl2`` grammar with ``UNKNOWN GOAL`` replaced by a templated goal, as ``add_task_to_grammar`` does.
"""
from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field

import alfworld.gen.constants as C
import alfworld.gen.goal_library as glib

from envs.alfworld.scenes import Receptacle

_MANGLE = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
_MANGLE_RE = re.compile("|".join(re.escape(k) for k in _MANGLE))
# Types the domain's actions name as constants (CleanObject needs SinkBasinType, SliceObject KnifeType, ...).
DOMAIN_RTYPES = ("SinkBasin", "Microwave", "Fridge")
DOMAIN_OTYPES = ("Knife", "ButterKnife")


def mangle(text: str) -> str:
    """ALFRED's id escaping for PDDL (all replacements at once, so "#"→"-" is not re-escaped)."""
    return _MANGLE_RE.sub(lambda m: _MANGLE[m.group(0)], text)


@dataclass(frozen=True)
class PlacedObject:
    """A portable object instance: ALFRED-style id, class, and the receptacle id it starts in."""

    id: str
    otype: str
    receptacle: str


@dataclass
class GameSpec:
    """Everything that defines one game; ``toggle_target`` is set for look_at_obj_in_light, else ``parent``."""

    task_type: str
    object_target: str
    parent_target: str
    toggle_target: str
    scene: int
    room: str
    receptacles: list[Receptacle]
    objects: list[PlacedObject]
    goal_text: str
    trial: str
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """``<task_type>-<Object>-<MovableRecep>-<Receptacle or lamp>-<scene>`` as in json_2.1.1."""
        target = self.toggle_target or self.parent_target
        return f"{self.task_type}-{self.object_target}-None-{target}-{self.scene}"


def _location(index: int, receptacle: Receptacle) -> str:
    # ALFRED names locations by grid pose; the index keeps two receptacles reached from one pose apart, because
    # the domain's "go to" template lists every receptacle at the destination.
    x, z, rot, hor = receptacle.pose
    return f"loc|{int(x * 4)}|{int(z * 4)}|{rot // 90}|{hor}|{index}"


def pddl_problem(spec: GameSpec) -> str:
    """The PDDL problem text (``initial_state.pddl``; also the ``pddl_problem`` of ``game.tw-pddl``)."""
    locations = {r.id: _location(i, r) for i, r in enumerate(spec.receptacles)}
    start = "loc|start"
    rtypes = sorted({r.rtype for r in spec.receptacles} | set(DOMAIN_RTYPES))
    otypes = sorted({o.otype for o in spec.objects} | set(DOMAIN_OTYPES) | {spec.object_target})
    objects = ["agent1 # agent"]
    objects += [f"{t}Type # otype" for t in otypes] + [f"{t}Type # rtype" for t in rtypes]
    objects += [f"{o.id} # object" for o in spec.objects]
    objects += [f"{r.id} # receptacle" for r in spec.receptacles]
    objects += [f"{loc} # location" for loc in [start, *locations.values()]]

    init = [f"(atLocation agent1 {start})"]
    for r in spec.receptacles:
        init.append(f"(receptacleType {r.id} {r.rtype}Type)")
        init.append(f"(receptacleAtLocation {r.id} {locations[r.id]})")
        if r.rtype in C.OPENABLE_CLASS_SET:
            init.append(f"(openable {r.id})")
    for o in spec.objects:
        init += [f"(objectType {o.id} {o.otype}Type)", f"(inReceptacle {o.id} {o.receptacle})",
                 f"(objectAtLocation {o.id} {locations[o.receptacle]})"]
        if o.otype in C.VAL_ACTION_OBJECTS["Toggleable"]:
            init.append(f"(toggleable {o.id})")
        else:
            init.append(f"(pickupable {o.id})")
        if o.otype in C.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {o.id})")
        for prop, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                           ("Sliceable", "sliceable")):
            if o.otype in C.VAL_ACTION_OBJECTS[prop]:
                init.append(f"({pred} {o.id})")
    for rt in rtypes:
        for ot in otypes:
            if ot in C.VAL_RECEPTACLE_OBJECTS.get(rt, ()):
                init.append(f"(canContain {rt}Type {ot}Type)")

    goal = glib.gdict[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep="")
    body = (f"(define (problem plan_{spec.trial})\n(:domain alfred)\n(:objects\n        "
            + "\n        ".join(objects) + "\n        )\n(:init\n        " + "\n        ".join(init) + "\n        )\n")
    return mangle(body) + mangle(goal).strip() + "\n"


def goal_templates(task_type: str) -> list[str]:
    return list(glib.gdict[task_type]["templates"])


def goal_text(template: str, obj: str, parent: str, toggle: str) -> str:
    """A goal template filled in the way ``alfworld.agents.utils.misc.get_templated_task_desc`` fills it."""
    return template.format(obj=obj.lower(), recep=parent.lower(), toggle=toggle.lower(), mrecep="")


def grammar(goal: str) -> str:
    """The wheel's ``alfred.twl2`` with the task line filled in (``add_task_to_grammar``)."""
    twl2 = (importlib.resources.files("alfworld") / "data" / "alfred.twl2").read_text()
    return twl2.replace("UNKNOWN GOAL", goal)


def domain() -> str:
    return (importlib.resources.files("alfworld") / "data" / "alfred.pddl").read_text()


def traj_data(spec: GameSpec) -> dict[str, object]:
    """The ``traj_data.json`` fields ALFWorld reads, plus provenance under ``opd_generator``."""
    return {
        "task_type": spec.task_type,
        "task_id": spec.trial,
        "scene": {"floor_plan": f"FloorPlan{spec.scene}", "scene_num": spec.scene, "room": spec.room},
        "pddl_params": {
            "object_target": spec.object_target,
            "parent_target": spec.parent_target,
            "toggle_target": spec.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "turk_annotations": {"anns": [{"task_desc": spec.goal_text, "high_descs": [], "votes": []}]},
        "opd_generator": spec.extras,
    }
