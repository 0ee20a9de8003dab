"""Where games come from: the built-in generated set (built once into a cache) or a folder in the official layout.

- :func:`default_games_root` builds a split of the default set on first use (``DEFAULT_COUNTS`` games per split,
  seed ``DEFAULT_SEED``) into ``$OPD_AGENTS_CACHE/alfworld/<version-hash>`` (default cache
  ``~/.cache/opd_agents``). The hash covers the generator version, the alfworld release and the counts, so a
  change rebuilds instead of reusing stale games. A split is generated into a temporary folder and renamed into
  place, so concurrent first uses never see a half-written split.
- :func:`resolve_root` picks the data root: ``data_path``, ``$ALFWORLD_DATA`` when it holds games, else the
  built-in set.
- :func:`find_games` lists the solvable games of a split under a data root laid out like official ALFWorld
  (``[<root>/]json_2.1.1/<split>/<task>-…/<trial>/{traj_data.json,game.tw-pddl}``), accepting our split names or
  the official ``valid_seen``/``valid_unseen`` folders, and skipping what official ALFWorld skips (movable
  receptacle and sliced tasks, games not marked solvable).
- Game files and ``traj_data.json`` are read through ``envs.user_files`` (regular files, bounded size, JSON errors
  with the line) and shape-checked (``GameFile``, ``TrajData``): a broken file is a ``ValueError`` naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from envs.alfworld.catalog import SPLIT_FOLDERS, SPLITS, TASK_TYPES, canonical_split
from envs.user_files import MIB, UserFileError, load_json, size_limit, validate

GENERATOR_VERSION = "1"
DEFAULT_SEED = 0
DEFAULT_COUNTS = {"train": 60, "eval_in_distribution": 90, "eval_out_of_distribution": 30}
_DONE = "COMPLETE"


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_AGENTS_CACHE", Path.home() / ".cache" / "opd_agents")) / "alfworld"


def _version_hash() -> str:
    key = json.dumps([GENERATOR_VERSION, version("alfworld"), DEFAULT_SEED, DEFAULT_COUNTS, TASK_TYPES])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def default_games_root(split: str = "train", workers: int | None = None) -> Path:
    """The built-in game set, with ``split`` generated on first use (about half a CPU-second per game).

    Splits are built independently, so training never waits for the evaluation games.
    """
    from envs.alfworld.generate import generate

    split = canonical_split(split)
    root = cache_dir() / _version_hash()
    if (root / f"{split}.{_DONE}").exists():
        return root
    (root / "json_2.1.1").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{split}-", dir=root))
    try:
        n = DEFAULT_COUNTS[split]
        made = generate(tmp, {split: n}, DEFAULT_SEED, splits=(split,),
                        workers=workers or min(4, os.cpu_count() or 1))[split]
        if len(made) < n:
            raise RuntimeError(f"ALFWorld game generation fell short for {split!r} ({len(made)}/{n} games); "
                               "this is a generator bug, please report it")
        try:
            (tmp / "json_2.1.1" / split).rename(root / "json_2.1.1" / split)
        except OSError:
            if not (root / "json_2.1.1" / split).is_dir():  # a concurrent builder's identical set is fine
                raise
        (root / f"{split}.{_DONE}").write_text(str(n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_root(data_path: str | os.PathLike[str] | None, split: str = "train") -> Path:
    """``data_path``, else ``$ALFWORLD_DATA`` if it holds games, else the built-in set (``split`` built if needed).

    Importing ``alfworld`` sets ``$ALFWORLD_DATA`` to its (usually empty) ``~/.cache/alfworld`` when unset, so
    the variable alone does not mean the user has data: an empty official cache falls back to the built-in games,
    any other folder without games is reported.
    """
    if data_path is not None:
        root = Path(data_path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"ALFWorld data_path={str(data_path)!r} is not a folder; give the data root that "
                                    "holds json_2.1.1/<split>/, or no data_path for the built-in games")
        return root
    env_root = os.environ.get("ALFWORLD_DATA")
    if env_root:
        root = Path(env_root).expanduser()
        if root.exists() and not root.is_dir():
            raise FileNotFoundError(f"$ALFWORLD_DATA={env_root!r} is not a folder; point it at the data root that "
                                    "holds json_2.1.1/<split>/, or unset it for the built-in games")
        if any(_split_dirs(root, split) for split in SPLITS):
            return root
        if root != Path("~/.cache/alfworld").expanduser():
            warnings.warn(f"$ALFWORLD_DATA={env_root} holds no json_2.1.1/<split> games; "
                          "using the built-in generated ALFWorld games", stacklevel=3)
    return default_games_root(split)


def _split_dirs(root: Path, split: str) -> list[Path]:
    bases = [root / "json_2.1.1", root] if (root / "json_2.1.1").is_dir() else [root]
    return [base / name for base in bases for name in SPLIT_FOLDERS[split] if (base / name).is_dir()]


GAME_MAX_BYTES = 64 * MIB  # official game files are well under 1 MiB, trajectories a few MiB


class GameFile(BaseModel):
    """`game.tw-pddl`: a JSON object with the PDDL domain, TextWorld grammar and PDDL problem (other keys kept)."""

    model_config = ConfigDict(extra="allow")
    pddl_domain: StrictStr
    grammar: StrictStr
    pddl_problem: StrictStr
    solvable: StrictBool = False


class TrajData(BaseModel):
    """`traj_data.json` beside a game: what the env reads of it is the task type (other keys kept)."""

    model_config = ConfigDict(extra="allow")
    task_type: str = Field(min_length=1, max_length=200, strict=True)


def read_game(path: Path) -> GameFile:
    """The game file at `path`, read and shape-checked through `envs.user_files` (errors name the file)."""
    return validate(GameFile, load_json(path, size_limit(GAME_MAX_BYTES), "ALFWorld game file"), path,
                    "ALFWorld game file")


def read_task_type(game_file: Path) -> str:
    """The task type in the `traj_data.json` beside `game_file`."""
    path = Path(game_file).parent / "traj_data.json"
    return validate(TrajData, load_json(path, size_limit(GAME_MAX_BYTES), "ALFWorld traj_data.json"), path,
                    "ALFWorld traj_data.json").task_type


def check_game_file(path: Path) -> None:
    """ValueError unless `path` is an ALFWorld game (a JSON object with the PDDL domain, grammar and problem) with
    its trial's traj_data.json beside it."""
    try:
        read_game(path)
        read_task_type(path)
    except UserFileError as exc:
        raise ValueError(f"{path} is not an ALFWorld game with its traj_data.json ({exc}); pass a game.tw-pddl of "
                         "the official layout or its trial folder") from None


def find_games(root: str | os.PathLike[str], split: str, task_types: tuple[str, ...] = TASK_TYPES) -> list[str]:
    """Sorted solvable game files of ``split`` under ``root``; a clear error when there are none."""
    root = Path(root).expanduser()
    split = canonical_split(split)
    games = []
    for folder in _split_dirs(root, split):
        for game_file in sorted(folder.rglob("game.tw-pddl")):
            # ALFWorld skips these by the task folder's name (``<task>-<obj>-<mrecep>-<recep>-<scene>``), never by
            # the rest of the path: a data root under ``~/Sliced-runs/`` must not hide every game.
            task_folder = game_file.parent.parent.name
            if "movable" in task_folder or "Sliced" in task_folder:
                continue
            if not (game_file.parent / "traj_data.json").exists():
                continue
            if read_task_type(game_file) not in task_types:
                continue
            if not read_game(game_file).solvable:
                continue
            games.append(str(game_file))
    if not games:
        names = " or ".join(SPLIT_FOLDERS[split])
        raise FileNotFoundError(
            f"no solvable ALFWorld games for split {split!r} (task types {list(task_types)}) under {root}. "
            f"Expected the official layout: {root}/json_2.1.1/{names}/<task>-<obj>-<mrecep>-<recep>-<scene>/"
            "<trial>/{traj_data.json,game.tw-pddl} with \"solvable\": true in game.tw-pddl "
            "(official data: run alfworld-generate; or build games with `python -m envs.alfworld.generate "
            f"--out {root} --n 60`). Known splits: {list(SPLITS)}.")
    return games
