"""Rooms for generated games, read from the AI2-THOR floor plans that the ``alfworld`` wheel ships.

``alfworld/gen/layouts/FloorPlan<N>-objects.json`` lists the object classes present in a real ALFRED room and
``FloorPlan<N>-openable.json`` the room's receptacle instances (ALFRED object ids such as
``Cabinet|+00.68|+00.50|-02.20``) with the agent pose that reaches each. A :class:`Scene` is that room reduced to
what a text game needs: receptacle instances (sinks and bathtubs become their ``SinkBasin``/``BathtubBasin``
receptacles, as in ALFWorld; static receptacle classes the room lists but the layout omits, e.g. stove burners,
get synthetic ids) and the classes of portable objects that may be placed in it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
from dataclasses import dataclass

import alfworld.gen.constants as C

ROOM_OF_SCENE_RANGE = {room: rng for room, rng in C.SCENE_TYPE.items()}

# Layout keys that ALFWorld turns into their basin receptacle (the id keeps the basin class as a suffix).
BASINS = {"Sink": "SinkBasin", "Bathtub": "BathtubBasin"}
STATIC_RECEPTACLES = frozenset(C.RECEPTACLES) - C.MOVABLE_RECEPTACLES_SET
# How many instances a receptacle class gets when the layout omits it (kitchens have four stove burners).
SUPPLEMENT_COUNT = {"StoveBurner": 4}
LAMP = "DeskLamp"
# Receptacles a desk lamp stands on in ALFRED rooms; the lamp is toggled where it stands.
LAMP_STANDS = ("Desk", "SideTable", "Dresser")
# Portable classes: anything some receptacle accepts, plus the movable receptacles (bowls, mugs, ...).
PORTABLE = frozenset(
    o for objs in C.VAL_RECEPTACLE_OBJECTS.values() for o in objs if not o.endswith("Sliced")
) - STATIC_RECEPTACLES | C.MOVABLE_RECEPTACLES_SET


@dataclass(frozen=True)
class Receptacle:
    """A receptacle instance: ALFRED id, class, and the agent pose (x, z, rotation, horizon) that reaches it."""

    id: str
    rtype: str
    pose: tuple[float, float, int, int]


@dataclass(frozen=True)
class Scene:
    """One floor plan: its number, room type, receptacle instances and the portable classes present."""

    number: int
    room: str
    receptacles: tuple[Receptacle, ...]
    object_types: tuple[str, ...]
    has_lamp: bool

    @property
    def receptacle_types(self) -> frozenset[str]:
        return frozenset(r.rtype for r in self.receptacles)


def room_of(number: int) -> str:
    for room, numbers in ROOM_OF_SCENE_RANGE.items():
        if number in numbers:
            return room
    raise ValueError(f"FloorPlan{number} is not an ALFRED room number")


def scene_numbers(held_out: bool) -> tuple[int, ...]:
    """ALFRED's own room split: training rooms, or the unseen test rooms used for out-of-distribution games."""
    return tuple(sorted(C.TEST_SCENE_NUMBERS if held_out else C.TRAIN_SCENE_NUMBERS))


def _synthetic_id(number: int, rtype: str, index: int) -> str:
    # Stable pseudo-coordinates so the id looks like ALFRED's and never depends on the process.
    digest = hashlib.sha256(f"{number}/{rtype}/{index}".encode()).digest()
    x, y, z = ((digest[i] / 255.0) * 6.0 - 3.0 for i in range(3))
    return f"{rtype}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"


def _read_layout(name: str) -> object:
    path = importlib.resources.files("alfworld.gen") / "layouts" / name
    return json.loads(path.read_text())


@functools.cache
def load_scene(number: int) -> Scene:
    """The :class:`Scene` of ``FloorPlan<number>``, built from the wheel's layout files."""
    openable: dict[str, list[float]] = _read_layout(f"FloorPlan{number}-openable.json")  # type: ignore[assignment]
    present: list[str] = _read_layout(f"FloorPlan{number}-objects.json")  # type: ignore[assignment]
    receptacles = []
    for object_id, pose in sorted(openable.items()):
        cls = object_id.split("|", 1)[0]
        # Basin ids already end in their receptacle class: "Sink|-03.12|-00.01|+01.53|SinkBasin".
        rtype = object_id.rsplit("|", 1)[1] if cls in BASINS else cls
        if rtype not in STATIC_RECEPTACLES:
            continue
        receptacles.append(Receptacle(object_id, rtype, (pose[0], pose[1], int(pose[2]), int(pose[3]))))
    have = {r.rtype for r in receptacles}
    basin_prefix = {basin: cls for cls, basin in BASINS.items()}
    for cls in sorted(set(present)):
        rtype = BASINS.get(cls, cls)
        if rtype in STATIC_RECEPTACLES and rtype not in have:
            have.add(rtype)
            for i in range(SUPPLEMENT_COUNT.get(rtype, 1)):
                rid = _synthetic_id(number, rtype, i)
                if rtype in basin_prefix:
                    # ALFWorld's demangler names a basin from the id's prefix plus "basin": keep THOR's form.
                    rid = f"{basin_prefix[rtype]}{rid[len(rtype):]}|{rtype}"
                receptacles.append(Receptacle(rid, rtype, (float(i), float(-i), 0, 30)))
    accepts = {rt for rt in have if rt in C.VAL_RECEPTACLE_OBJECTS}
    object_types = tuple(sorted(
        o for o in set(present) & PORTABLE
        if any(o in C.VAL_RECEPTACLE_OBJECTS[rt] for rt in accepts)
    ))
    has_lamp = LAMP in present and any(rt in have for rt in LAMP_STANDS)
    return Scene(number, room_of(number), tuple(receptacles), object_types, has_lamp)
