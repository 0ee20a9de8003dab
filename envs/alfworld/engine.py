"""The real ALFWorld text engine, assembled the way official ALFWorld assembles it, behind a small interface.

``textworld.envs.PddlEnv`` (fast-downward for the PDDL state, TextWorld's grammar for the text) wrapped in
ALFWorld's ``AlfredDemangler`` (``cabinet 1`` instead of PDDL ids), ``AlfredInfos`` (the game file) and, when an
expert is wanted, ``AlfredExpert`` (``planner``: fast-downward replans from the current state every step;
``handcoded``: ALFWorld's heuristic explorer). Used by the Gymnasium env and by the generator's replay check.

Speed: TextWorld re-parses every grammar string and every logic query with tatsu each time it renders text (every
admissible command, every step), which dominates step time, and translates the PDDL problem with fast-downward
twice per ``load`` and twice per ``reset``. :func:`install_caches` memoises these pure functions (parses return
deep copies, because derivation mutates the symbols): steps get ~5x faster and a reset of an already loaded game
nearly free, with byte-identical output (tested against the uncached engine).

``load(path, data)`` plays ``data`` (the game file's JSON, e.g. converted by :mod:`envs.alfworld.vocabulary`) in
place of the file's text, while the wrappers still see ``path`` (the handcoded expert reads the ``traj_data.json``
beside it).
"""
from __future__ import annotations

import contextlib
import copy
import random
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import fast_downward
import textworld
import textworld.envs.pddl.textgen as textgen
import textworld.logic as twlogic
from alfworld.agents.environment.alfred_tw_env import (
    AlfredDemangler,
    AlfredExpert,
    AlfredExpertType,
    AlfredInfos,
)
from textworld.envs import PddlEnv

from envs.alfworld.catalog import EXPERTS

_PARSE_CACHE_MAX = 20_000
_TRANSLATION_CACHE_MAX = 16


def install_caches() -> None:
    """Memoise grammar parsing and PDDL translation process-wide (idempotent; see the module docstring)."""
    _cache_parse()
    _cache_translation()


def _cache_translation() -> None:
    original = fast_downward.pddl2sas
    if getattr(original, "_opd_cached", False):
        return
    cache: dict[tuple[str, str, bool], Any] = {}

    def cached(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        key = (domain, problem, optimize)
        if key not in cache:
            if len(cache) >= _TRANSLATION_CACHE_MAX:
                cache.pop(next(iter(cache)))
            argv = sys.argv[:]  # fast-downward overwrites sys.argv to configure its translator; put it back
            try:
                cache[key] = original(domain, problem, verbose=verbose, optimize=optimize)
            finally:
                sys.argv = argv
        return cache[key]

    cached._opd_cached = True  # type: ignore[attr-defined]
    fast_downward.pddl2sas = cached


def _cache_parse() -> None:
    # Both tatsu front ends: the grammar's symbols (textgen) and the logic's rules and propositions (the
    # conjunctive queries the grammar evaluates for every admissible command).
    for module in (textgen, twlogic):
        _cache_module_parse(module)


def _cache_module_parse(module: Any) -> None:
    original = module._parse_and_convert
    if getattr(original, "_opd_cached", False):
        return
    cache: dict[tuple[str, str], Any] = {}

    def cached(text: str, rule_name: str = "start", trace: bool = False, **kwargs: Any) -> Any:
        if trace or kwargs:
            return original(text, rule_name=rule_name, trace=trace, **kwargs)
        key = (text, rule_name)
        if key not in cache:
            if len(cache) >= _PARSE_CACHE_MAX:
                cache.clear()
            cache[key] = original(text, rule_name=rule_name)
        return copy.deepcopy(cache[key])

    cached._opd_cached = True  # type: ignore[attr-defined]
    module._parse_and_convert = cached


@contextlib.contextmanager
def isolated_random(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` for a block and restore it after.

    ALFWorld's handcoded expert breaks ties with the global ``random``; this keeps its choices reproducible
    without disturbing anyone else's random stream.
    """
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


class _DataPddlEnv(PddlEnv):  # type: ignore[misc]
    """``PddlEnv`` that loads the JSON set in ``data`` (when set) for the file path it is given."""

    data: Mapping[str, Any] | None = None

    def load(self, filename_or_data: Any) -> None:
        if self.data is None:
            return super().load(filename_or_data)
        super().load(self.data)
        self._game_file = filename_or_data


class Engine:
    """One TextWorld PDDL game at a time: ``load(path)``, ``reset()``, ``step(command)``."""

    def __init__(self, expert: str | None = "planner", walkthrough: bool = False) -> None:
        if expert is not None and expert not in EXPERTS:
            raise ValueError(f"unknown ALFWorld expert {expert!r}; expected one of {EXPERTS} or None")
        install_caches()
        extras = ["gamefile"] + (["expert_plan"] if expert else []) + (["walkthrough"] if walkthrough else [])
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
        self._base = _DataPddlEnv(infos)
        env: Any = AlfredInfos(AlfredDemangler(self._base, shuffle=False))
        if expert is not None:
            kind = AlfredExpertType.PLANNER if expert == "planner" else AlfredExpertType.HANDCODED
            env = AlfredExpert(env, expert_type=kind)
        self.expert = expert
        self._env = env
        self._seed = 0
        self._moves = 0

    def load(self, game_file: str, data: Mapping[str, Any] | None = None) -> None:
        """Load ``game_file``; with ``data``, play that JSON instead of the file's own text."""
        self._base.data = data
        try:
            self._env.load(game_file)
        finally:
            self._base.data = None

    def _call(self, fn: Any, *args: Any) -> Any:
        if self.expert != "handcoded":
            return fn(*args)
        with isolated_random(self._seed * 1_000_003 + self._moves):
            return fn(*args)

    def reset(self, seed: int = 0) -> Any:
        self._seed, self._moves = seed, 0
        return self._call(self._env.reset)

    def step(self, command: str) -> tuple[Any, float, bool]:
        """Apply ``command``; an unknown command is the engine's "Nothing happens.", never an error."""
        self._moves += 1
        try:
            return self._call(self._env.step, command)
        except Exception:  # noqa: BLE001 - ALFWorld's handcoded expert raises when it gives up; the move stands.
            if self.expert != "handcoded":
                raise
            state = self._env.state
            state["extra.expert_plan"] = []
            return state, float(state["won"]), bool(state["won"])

    def close(self) -> None:
        self._env.close()
