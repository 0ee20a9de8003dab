"""``opd/ALFWorld-v0``: ALFWorld text games as a Gymnasium env (the DESIGN.md Environment contract).

Observation: the game text (room + task on reset, without TextWorld's banner; the engine's feedback after each
step). Action: the model's command text (whitespace and case normalised; anything the engine does not know gets
its "Nothing happens."). Reward 1.0 on the step that wins; ``terminated`` on a win, ``truncated`` after
``max_steps`` moves (50, as in the paper). ``info``: ``admissible_commands``, ``won``, ``success``,
``task_type``, ``task``, ``game_path``, ``expert_action`` (the expert's next command, or None), ``steps``,
``game_vintage`` (``"pre-0.4"``: the file places with ``put X in/on Y``; ``"0.4+"``: with ``move X to Y``),
``translated_action`` (the command a near-miss placing action was played as on this step, else None) and
``translated_actions`` (how many this episode).

Command vocabulary (``command_vocabulary``, :mod:`envs.alfworld.vocabulary`): ``"unified"`` (default) converts a
pre-0.4 game in memory at load as alfworld's ``patch_tw-pddl.py`` would, so every game speaks alfworld >= 0.4's
commands and feedback; ``"native"`` plays each file's own text. Either way a placing action in another phrasing
(``put X in Y``, ``put X on Y``, the other vintage's form) is played as the one admissible command it names.

Games: any folder in the official layout (``data_path=``, or ``$ALFWORLD_DATA`` when it holds games), else the
built-in generated set; ``split`` accepts our names and the official aliases, ``task_types`` names or ids 1-6.
Other kwargs: ``max_steps``, ``expert`` (``"planner"``, ``"handcoded"`` or None for no expert and faster steps),
``num_games`` (first N games of the split), ``adapter`` (kwargs of :class:`ALFWorldPromptAdapter`).
"""
from __future__ import annotations

import numbers
import os
import string
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from envs.alfworld.catalog import EXPERTS, canonical_split, canonical_task_types
from envs.alfworld.data import check_game_file, find_games, read_game, read_task_type, resolve_root
from envs.alfworld.prompt import MAX_ACTION_CHARS, ALFWorldPromptAdapter
from envs.alfworld.vocabulary import UNIFIED, VOCABULARIES, convert_game, is_old_vintage, translate_placing

BANNER = "-= Welcome to TextWorld, ALFRED! =-"
MAX_OBSERVATION_CHARS = 8192
MAX_ACTION_SPACE_CHARS = 4096
_CHARSET = frozenset(string.printable)


def _fit(text: str, limit: int) -> str:
    """Keep a string inside the Text space: printable characters only, at most ``limit`` of them."""
    return "".join(ch if ch in _CHARSET else "?" for ch in text)[:limit]


class ALFWorldEnv(gym.Env[str, str]):
    """One ALFWorld game per episode, played through the real TextWorld/ALFWorld engine."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        split: str = "train",
        data_path: str | os.PathLike[str] | None = None,
        task_types: list[str | int] | tuple[str | int, ...] | None = None,
        max_steps: int = 50,
        expert: str | None = "planner",
        num_games: int | None = None,
        adapter: dict[str, Any] | None = None,
        command_vocabulary: str = UNIFIED,
        render_mode: str | None = None,
    ) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if num_games is not None and (isinstance(num_games, bool) or not isinstance(num_games, int) or num_games < 1):
            raise ValueError(f"num_games must be an integer >= 1 (or None for every game), got {num_games!r}")
        if expert is not None and expert not in EXPERTS:
            raise ValueError(f"unknown ALFWorld expert {expert!r}; expected one of {list(EXPERTS)} or None")
        if command_vocabulary not in VOCABULARIES:
            raise ValueError(f"unknown command_vocabulary {command_vocabulary!r}; expected one of {list(VOCABULARIES)} "
                             f"({UNIFIED!r}: alfworld >= 0.4's commands for every game; 'native': each file's own)")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode {render_mode!r} is not supported; use None or 'ansi'")
        self.split = canonical_split(split)
        self.task_types = canonical_task_types(task_types)
        self.data_path = str(resolve_root(data_path, self.split))
        self.game_files = find_games(self.data_path, self.split, self.task_types)[:num_games]
        self.max_steps = max_steps
        self.expert = expert
        self.command_vocabulary = command_vocabulary
        self.adapter_kwargs = dict(adapter or {})
        self.prompt_adapter()  # a bad adapter option fails here, not mid-rollout
        self.render_mode = render_mode
        self.observation_space = spaces.Text(max_length=MAX_OBSERVATION_CHARS, charset=string.printable)
        self.action_space = spaces.Text(max_length=MAX_ACTION_SPACE_CHARS, charset=string.printable)
        self._engine: Any = None
        self._loaded: str | None = None
        self._game: str | None = None
        self._task_type = ""
        self._task = ""
        self._vintage = ""
        self._admissible: list[str] = []
        self._translated = 0
        self._steps = 0
        self._won = False
        self._last_obs = ""

    @property
    def num_items(self) -> int:
        """Distinct games ``reset(options={"game": i})`` can pick (evaluation plays items 0..n-1)."""
        return len(self.game_files)

    def prompt_adapter(self) -> ALFWorldPromptAdapter:
        return ALFWorldPromptAdapter(**self.adapter_kwargs)

    def _pick_game(self, options: dict[str, Any] | None) -> str:
        choice = (options or {}).get("game")
        if choice is None:
            return self.game_files[int(self.np_random.integers(len(self.game_files)))]
        if isinstance(choice, numbers.Integral):
            choice = int(choice)
            if not -len(self.game_files) <= choice < len(self.game_files):
                raise IndexError(f"options['game']={choice} but split {self.split!r} has {len(self.game_files)} games")
            return self.game_files[choice]
        path = Path(choice).expanduser()
        path = path / "game.tw-pddl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"options['game']={choice!r}: expected a game.tw-pddl file or its trial folder")
        check_game_file(path)
        return str(path)

    @property
    def item_strata(self) -> list[str]:
        """Each game's task type, in ``game_files`` order (evaluation samples a subset stratified by it)."""
        return [read_task_type(Path(game)) for game in self.game_files]

    def _info(self, state: Any, translated: str | None = None) -> dict[str, Any]:
        plan = state.get("extra.expert_plan") if self.expert else None
        won = bool(state["won"])
        self._admissible = list(state["admissible_commands"])
        return {
            "admissible_commands": list(self._admissible),
            "won": won,
            "success": won,
            "task_type": self._task_type,
            "task": self._task,
            "game_path": self._game,
            "expert_action": plan[0] if plan else None,
            "steps": self._steps,
            "game_vintage": self._vintage,
            "translated_action": translated,
            "translated_actions": self._translated,
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        game = self._pick_game(options)
        if self._engine is None:
            from envs.alfworld.engine import Engine  # textworld is imported only when a game is played

            self._engine = Engine(expert=self.expert)
        if game != self._loaded:
            data = read_game(Path(game)).model_dump()
            old = is_old_vintage(data)
            try:
                self._engine.load(game, convert_game(data) if old and self.command_vocabulary == UNIFIED else None)
            except (Exception, SystemExit) as exc:  # the engine (PDDL translator, grammar) raises anything, exits too
                self._loaded = None
                raise ValueError(f"ALFWorld game file {game!r} cannot be loaded by the engine ({type(exc).__name__}: "
                                 f"{str(exc)[:300]}); fix or remove that game") from None
            self._loaded = game
            self._task_type = read_task_type(Path(game))
            self._vintage = "pre-0.4" if old else "0.4+"
        self._game = game
        state = self._engine.reset(seed=int(self.np_random.integers(2**31)))
        # Official ALFWorld agents never see TextWorld's banner, only the room and the task.
        obs = str(state["feedback"]).replace(BANNER, "", 1).strip()
        _, _, task = obs.partition("Your task is to:")
        self._task = task.strip().rstrip(".")
        self._steps, self._won, self._translated = 0, False, 0
        self._last_obs = _fit(obs, MAX_OBSERVATION_CHARS)
        return self._last_obs, self._info(state)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._engine is None or self._game is None:
            raise RuntimeError("ALFWorldEnv.step() called before reset()")
        command = " ".join(str(action).lower().split())[:MAX_ACTION_CHARS]
        translated = translate_placing(command, self._admissible)
        self._translated += translated is not None
        state, _, _ = self._engine.step(translated or command)
        self._steps += 1
        won = bool(state["won"])
        reward = 1.0 if won and not self._won else 0.0
        self._won = self._won or won
        self._last_obs = _fit(str(state["feedback"]).strip(), MAX_OBSERVATION_CHARS)
        truncated = not won and self._steps >= self.max_steps
        return self._last_obs, reward, won, truncated, self._info(state, translated)

    def render(self) -> str | None:
        return self._last_obs if self.render_mode == "ansi" else None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._loaded, self._game = None, None, None
