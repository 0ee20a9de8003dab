"""ALFWorld's two command vocabularies, and how the env shows a model one of them whatever the data's vintage.

The official ``json_2.1.1`` games as released before alfworld 0.4 ("old vintage") place an object with
``put {o} in/on {r}`` ("You put the mug 1 in/on the desk 1.") and answer ``go to`` with "You arrive at loc 13.";
alfworld >= 0.4 (PR #94; the games this project generates; old files converted by the repository's
``scripts/patch_tw-pddl.py``) says ``move {o} to {r}`` ("You move the mug 1 to the desk 1."), "You arrive at desk
1." and adds a ``help`` command. The pip package ships no conversion code (the patch script is not in the wheel),
so :func:`convert_game` applies the same edits as that script (alfworld is MIT), with the ``help`` action and
grammar taken from the wheel's own ``alfworld/data/alfred.pddl`` and ``alfred.twl2``.

Design: convert at load, in memory (``game.tw-pddl``'s JSON is edited before the engine reads it; the user's file
is never written). Every text a model sees (admissible commands, feedback, the planner's expert plan, the handcoded
expert's commands) is rendered by the engine from the game's grammar, so converting the grammar makes an old game
behave exactly as the patched file would. Mapping at the step boundary could not: "You arrive at loc 13" names a
PDDL location, not the receptacle the new vintage names, and the expert's plan and admissible lists would each need
their own rewrite.

:func:`translate_placing` accepts the near-misses alfworld issue #78 reports LLM agents losing games to
(``put X in Y``, ``put X on Y``, and either vintage's form on a game of the other) when exactly one admissible
command places that object on that receptacle.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Sequence
from typing import Any

UNIFIED = "unified"  # every game speaks alfworld >= 0.4's vocabulary (old-vintage games converted at load)
NATIVE = "native"  # every game speaks the vocabulary its file was written in
VOCABULARIES = (UNIFIED, NATIVE)

OLD_PLACE_TEMPLATE = "put {o} in/on {r}"
NEW_PLACE_TEMPLATE = "move {o} to {r}"
# The grammar edits of alfworld's scripts/patch_tw-pddl.py (json_2.1.1 -> 2.1.2), in its order.
GRAMMAR_EDITS = (("You arrive at {lend.name}.", "You arrive at {r.name}."),
                 (OLD_PLACE_TEMPLATE, NEW_PLACE_TEMPLATE),
                 ("You put the {o.name} in/on the {r.name}.", "You move the {o.name} to the {r.name}."))
# Placing phrasings: "move X to Y" (>= 0.4), "put X in/on Y" (old vintage), "put X in Y" / "put X on Y" (issue #78).
_PLACING = re.compile(r"(?:move (?P<move>.+)|put (?P<put>.+))")
_SEPARATORS = {"move": (" to ",), "put": (" in/on ", " in ", " on ")}


def is_old_vintage(game: dict[str, Any]) -> bool:
    """Whether a game file's JSON speaks the pre-0.4 vocabulary (its grammar places with ``put {o} in/on {r}``)."""
    return OLD_PLACE_TEMPLATE in str(game.get("grammar", ""))


@functools.cache
def _help_parts() -> tuple[str, str]:
    """The ``help`` action of the wheel's alfred.pddl and its grammar block of alfred.twl2 (what the patch adds)."""
    data = importlib.resources.files("alfworld") / "data"
    action = _block(data.joinpath("alfred.pddl").read_text(), "(:action help", "(", ")")
    grammar = _block(data.joinpath("alfred.twl2").read_text(), "action help {", "{", "}")
    return action, grammar


def _block(text: str, head: str, open_char: str, close_char: str) -> str:
    """The balanced block of ``text`` that starts at ``head``."""
    start = text.find(head)
    if start < 0:
        raise RuntimeError(f"the installed alfworld package's data has no {head!r} block; reinstall alfworld>=0.4 "
                           "or play old-vintage games with command_vocabulary='native'")
    depth = 0
    for end in range(start, len(text)):
        depth += (text[end] == open_char) - (text[end] == close_char)
        if depth == 0 and end > start + len(head) - 1:
            return text[start:end + 1]
    raise RuntimeError(f"unbalanced {head!r} block in the installed alfworld package's data; reinstall alfworld")


def convert_game(game: dict[str, Any]) -> dict[str, Any]:
    """An old-vintage game's JSON as alfworld's patch would write it (a new dict; ``game`` is left as it is).

    New-vintage games are returned unchanged.
    """
    if not is_old_vintage(game):
        return game
    action, help_grammar = _help_parts()
    grammar = str(game["grammar"])
    for old, new in GRAMMAR_EDITS:
        grammar = grammar.replace(old, new)
    before, after = str(game["pddl_domain"]).rsplit(")", 1)
    return {**game, "pddl_domain": f"{before}{action}\n){after}", "grammar": f"{grammar}\n{help_grammar}\n"}


def placing_pairs(command: str) -> list[tuple[str, str]]:
    """Every (object, receptacle) reading of a placing command in any phrasing; [] for other commands."""
    match = _PLACING.fullmatch(command)
    if match is None:
        return []
    verb = "move" if match.group("move") is not None else "put"
    rest = match.group(verb)
    pairs = []
    for sep in _SEPARATORS[verb]:
        start = rest.find(sep)
        while start > 0:
            obj, recep = rest[:start], rest[start + len(sep):]
            if recep:
                pairs.append((obj, recep))
            start = rest.find(sep, start + 1)
    return pairs


def translate_placing(command: str, admissible: Sequence[str]) -> str | None:
    """The one admissible command that places what ``command`` names where it names it, in the game's phrasing.

    None when ``command`` is admissible as it is, is no placing command, or matches no or several admissible
    commands (an ambiguous near-miss is left to the engine's "Nothing happens.").
    """
    if command in admissible:
        return None
    wanted = set(placing_pairs(command))
    if not wanted:
        return None
    matches = [a for a in admissible if wanted.intersection(placing_pairs(a))]
    return matches[0] if len(matches) == 1 else None


def place_command(obj: str, recep: str, admissible: Sequence[str]) -> str:
    """The command placing ``obj`` on ``recep`` in the vocabulary ``admissible`` speaks (new vintage by default)."""
    old = OLD_PLACE_TEMPLATE.format(o=obj, r=recep)
    return old if old in admissible else NEW_PLACE_TEMPLATE.format(o=obj, r=recep)
