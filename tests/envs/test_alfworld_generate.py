"""The ALFWorld game generator, checked through the real TextWorld/ALFWorld engine (no mocks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.alfworld.catalog import TASK_TYPES, is_held_out
from envs.alfworld.data import find_games
from envs.alfworld.generate import generate, main
from envs.alfworld.scenes import scene_numbers

COUNTS = {"train": 6, "eval_in_distribution": 3, "eval_out_of_distribution": 6}


@pytest.fixture(scope="module")
def games(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("alfworld_games")
    return generate(out, COUNTS, seed=7, workers=2)


def _traj(game_file: str) -> dict:
    return json.loads((Path(game_file).parent / "traj_data.json").read_text())


def test_every_split_is_complete_and_covers_all_six_task_types(games: dict[str, list[str]]) -> None:
    for split, n in COUNTS.items():
        assert len(games[split]) == n
    assert {_traj(g)["task_type"] for g in games["train"]} == set(TASK_TYPES)
    assert {_traj(g)["task_type"] for g in games["eval_out_of_distribution"]} == set(TASK_TYPES)


def test_official_layout_and_file_format(games: dict[str, list[str]]) -> None:
    game = Path(games["train"][0])
    trial, task_folder, split_folder, json_folder = game.parents[0], game.parents[1], game.parents[2], game.parents[3]
    assert (json_folder.name, split_folder.name) == ("json_2.1.1", "train")
    assert task_folder.name.startswith(_traj(str(game))["task_type"] + "-")
    assert {p.name for p in trial.iterdir()} == {"traj_data.json", "initial_state.pddl", "game.tw-pddl"}
    data = json.loads(game.read_text())
    assert set(data) >= {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
    assert data["solvable"] is True and data["walkthrough"]
    goal = _traj(str(game))["turk_annotations"]["anns"][0]["task_desc"]
    assert "UNKNOWN GOAL" not in data["grammar"] and f"Your task is to: {goal}." in data["grammar"]
    assert data["pddl_problem"] == (trial / "initial_state.pddl").read_text()
    for predicate in ("(canContain", "(receptacleAtLocation", "(inReceptacle", "(pickupable", "(atLocation agent1"):
        assert predicate in data["pddl_problem"]


def test_same_seed_gives_identical_files(games: dict[str, list[str]], tmp_path: Path) -> None:
    again = generate(tmp_path, {"train": 3}, seed=7, splits=("train",), workers=1)["train"]
    first_root = Path(games["train"][0]).parents[3]
    for path in again:
        rel = Path(path).relative_to(tmp_path / "json_2.1.1")
        for name in ("traj_data.json", "initial_state.pddl", "game.tw-pddl"):
            assert (Path(path).parent / name).read_bytes() == (first_root / rel).parent.joinpath(name).read_bytes()
    other = generate(tmp_path / "other", {"train": 1}, seed=8, splits=("train",))["train"][0]
    assert Path(other).read_text() != Path(games["train"][0]).read_text()


def _replay_all(game_files: list[str]) -> None:
    from envs.alfworld.engine import Engine

    engine = Engine(expert=None)
    for game in game_files:
        engine.load(game)
        state = engine.reset()
        for command in json.loads(Path(game).read_text())["walkthrough"]:
            assert command in state["admissible_commands"], (game, command)
            state, _, _ = engine.step(command)
        assert state["won"], game


def test_every_train_walkthrough_replays_to_a_win(games: dict[str, list[str]]) -> None:
    _replay_all(games["train"])  # one game of each task type; the generator itself replays every game it writes


@pytest.mark.slow
def test_every_walkthrough_replays_to_a_win(games: dict[str, list[str]]) -> None:
    _replay_all([g for split in games.values() for g in split])


def test_out_of_distribution_split_is_disjoint_from_train(games: dict[str, list[str]]) -> None:
    def combo(game: str) -> tuple[str, str, str]:
        t = _traj(game)
        p = t["pddl_params"]
        return t["task_type"], p["object_target"], p["toggle_target"] or p["parent_target"]

    train = {combo(g) for g in games["train"] + games["eval_in_distribution"]}
    ood = {combo(g) for g in games["eval_out_of_distribution"]}
    assert not train & ood
    assert all(is_held_out(*c) for c in ood) and not any(is_held_out(*c) for c in train)
    train_rooms = {_traj(g)["scene"]["scene_num"] for g in games["train"]}
    ood_rooms = {_traj(g)["scene"]["scene_num"] for g in games["eval_out_of_distribution"]}
    assert train_rooms <= set(scene_numbers(held_out=False)) and ood_rooms <= set(scene_numbers(held_out=True))
    assert not train_rooms & ood_rooms


def test_find_games_filters_and_explains(games: dict[str, list[str]], tmp_path: Path) -> None:
    root = Path(games["train"][0]).parents[3].parent
    assert find_games(root, "train") == sorted(games["train"])
    only = find_games(root, "valid_unseen", ("look_at_obj_in_light",))
    assert only and all(_traj(g)["task_type"] == "look_at_obj_in_light" for g in only)
    with pytest.raises(FileNotFoundError, match="json_2.1.1/eval_in_distribution or valid_seen"):
        find_games(tmp_path, "eval_in_distribution")


def test_cli_writes_requested_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--out", str(tmp_path), "--n", "1", "--seed", "3", "--split", "valid_seen",
                 "--task-type", "pick_heat_then_place_in_recep", "--workers", "1"])
    assert code == 0 and "eval_in_distribution: 1/1" in capsys.readouterr().out
    (game,) = find_games(tmp_path, "eval_in_distribution")
    assert _traj(game)["task_type"] == "pick_heat_then_place_in_recep"


def test_unguarded_script_fails_with_advice_instead_of_hanging(tmp_path: Path) -> None:
    """A script that generates at import time makes every spawned worker generate too; that must fail, not hang."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from envs.alfworld.generate import generate\ngenerate({str(tmp_path / 'out')!r}, 2, "
                      "splits=('train',), workers=2)\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=repo,
                            env=env)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr
