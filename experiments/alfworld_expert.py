"""How well the planner expert plays a split of official ALFWorld games: a check that the games load and are
winnable through this env exactly as a user with `alfworld-download` data would run them.

    python -m experiments.alfworld_expert --data ../shared/data/alfworld --split valid_seen [--workers 2]

Plays every solvable game of the split (``find_games``, ALFWorld's own exclusions) once, always taking the expert's
next command (``info["expert_action"]``, fast-downward replanning from the current state), with the paper's 50-step
limit. Prints a table and writes ``experiments/results/alfworld_official/expert_<split>.json``: games, wins, win rate
per task type, steps and seconds per game (wall time on this machine, so an estimate that drifts with load).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "alfworld_official"


_ENV: Any = None  # one env per worker process: loading a game's engine is the expensive part of a reset


def _open(data_path: str, split: str, max_steps: int) -> None:
    global _ENV
    from envs.alfworld.env import ALFWorldEnv

    _ENV = ALFWorldEnv(split=split, data_path=data_path, max_steps=max_steps, expert="planner")


def _play(index: int) -> dict[str, Any]:
    """One expert episode on game ``index`` of the split."""
    started = time.perf_counter()
    _, info = _ENV.reset(options={"game": index})
    done, steps = False, 0
    while not done:
        action = info["expert_action"] or "look"  # a planner with no plan: keep the episode going to its limit
        _, _, terminated, truncated, info = _ENV.step(action)
        done, steps = terminated or truncated, steps + 1
    return {"game": str(Path(info["game_path"]).parent.parent.name), "task_type": info["task_type"],
            "won": bool(info["won"]), "steps": steps, "seconds": time.perf_counter() - started}


def run(data_path: str, split: str, workers: int = 1, limit: int | None = None, max_steps: int = 50,
        progress: bool = False, games: list[int] | None = None) -> dict[str, Any]:
    """Play the split's games (those at ``games``, else the first ``limit``, else all) on ``workers`` processes;
    the summary ``main`` stores."""
    from envs.alfworld.data import find_games

    n = len(find_games(data_path, split))
    indices = games if games is not None else list(range(n if limit is None else min(n, limit)))
    started = time.perf_counter()
    records = []
    with ProcessPoolExecutor(max(1, workers), initializer=_open, initargs=(data_path, split, max_steps)) as pool:
        for record in pool.map(_play, indices):
            records.append(record)
            if progress:
                print(f"[{len(records)}/{len(indices)}] {record['game']}: {'won' if record['won'] else 'LOST'} in "
                      f"{record['steps']} steps, {record['seconds']:.1f} s", flush=True)
    wall = time.perf_counter() - started
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_type[r["task_type"]].append(r["won"])
    wins = sum(r["won"] for r in records)
    return {
        "split": split, "games": len(records), "wins": wins, "win_rate": wins / len(records),
        "per_task_type": {t: {"games": len(w), "win_rate": sum(w) / len(w)} for t, w in sorted(by_type.items())},
        "mean_steps": sum(r["steps"] for r in records) / len(records),
        "seconds_per_game": sum(r["seconds"] for r in records) / len(records),
        "wall_s": wall, "workers": workers, "cpus": os.cpu_count(),
        "lost": [r["game"] for r in records if not r["won"]],
        "games_detail": records,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder holding json_2.1.1 (as $ALFWORLD_DATA)")
    parser.add_argument("--split", default="valid_seen", help="train, valid_seen or valid_unseen (or our names)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--limit", type=int, default=None, help="first N games only (a smoke run; not stored)")
    args = parser.parse_args(argv)
    result = run(args.data, args.split, args.workers, args.limit, progress=True)
    print(f"{'task type':34} {'games':>5} {'win rate':>9}")
    for task_type, row in result["per_task_type"].items():
        print(f"{task_type:34} {row['games']:>5} {row['win_rate']:>9.1%}")
    print(f"{'all':34} {result['games']:>5} {result['win_rate']:>9.1%}   {result['seconds_per_game']:.2f} s/game, "
          f"{result['mean_steps']:.1f} steps/game, wall {result['wall_s']:.0f} s on {result['workers']} workers")
    if args.limit is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"expert_{args.split}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
