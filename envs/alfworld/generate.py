"""The game generator: sample games, solve them with the engine's planner, keep only those that replay to a win.

``python -m envs.alfworld.generate --out DIR --n N --seed S [--split train ...] [--task-type ...] [--workers W]``
writes ``DIR/json_2.1.1/<split>/<task>-<Obj>-None-<Recep>-<scene>/trial_S<seed>_<i>/`` with
``traj_data.json``, ``initial_state.pddl`` and ``game.tw-pddl`` (the official ALFWorld layout and file format).

Game ``i`` of a split is a pure function of ``(seed, split, i)``: task types rotate with ``i`` so every type is
represented, the sampler draws from ``random.Random(f"{seed}/{split}/{i}/{attempt}")``, and the walkthrough is
fast-downward's plan for the initial state (through TextWorld's PDDL env), replayed step by step through the
same engine; a game whose plan does not end in a win is redrawn with the next ``attempt``. Same seed → identical
files, whatever the number of workers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

from envs.alfworld.catalog import SPLITS, TASK_TYPES, canonical_split, canonical_task_types
from envs.alfworld.problem import GameSpec, domain, grammar, pddl_problem, traj_data

if TYPE_CHECKING:
    from envs.alfworld.engine import Engine

MAX_ATTEMPTS = 20
_ENGINE: Engine | None = None  # one engine per worker process; building it imports textworld (seconds)


def _engine() -> Engine:
    global _ENGINE
    if _ENGINE is None:
        from envs.alfworld.engine import Engine

        _ENGINE = Engine(expert=None, walkthrough=True)
    return _ENGINE


def _write(spec: GameSpec, folder: Path, walkthrough: list[str] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    problem = pddl_problem(spec)
    (folder / "initial_state.pddl").write_text(problem)
    (folder / "traj_data.json").write_text(json.dumps(traj_data(spec), indent=2) + "\n")
    game = {"pddl_domain": domain(), "grammar": grammar(spec.goal_text), "pddl_problem": problem,
            "solvable": walkthrough is not None, "walkthrough": walkthrough}
    path = folder / "game.tw-pddl"
    path.write_text(json.dumps(game))
    return path


def solve(game_file: Path) -> list[str] | None:
    """The planner's walkthrough if replaying it through the engine wins the game, else None."""
    engine = _engine()
    engine.load(str(game_file))
    state = engine.reset()
    plan = list(state["extra.walkthrough"] or [])
    for command in plan:
        state, _, done = engine.step(command)
        if done:
            break
    return plan if state["won"] and plan else None


def build_game(out: Path, seed: int, split: str, index: int, task_types: tuple[str, ...]) -> str | None:
    """Generate, solve and write game ``index`` of ``split``; the game file's path, or None if none was found."""
    from envs.alfworld.sample import sample_game

    task_type = task_types[index % len(task_types)]
    ood = split == "eval_out_of_distribution"
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(f"{seed}/{split}/{index}/{attempt}")
        spec = sample_game(rng, task_type, ood=ood, trial=f"trial_S{seed}_{index:05d}")
        if spec is None:
            return None
        spec.extras = {"seed": seed, "split": split, "index": index, "attempt": attempt}
        folder = out / "json_2.1.1" / split / spec.folder / spec.trial
        path = _write(spec, folder, None)
        walkthrough = solve(path)
        if walkthrough is not None:
            return str(_write(spec, folder, walkthrough))
        shutil.rmtree(folder)
    return None


def _job(args: tuple[Path, int, str, int, tuple[str, ...]]) -> str | None:
    return build_game(*args)


def generate(
    out: str | os.PathLike[str], n: int | dict[str, int], seed: int = 0,
    splits: tuple[str, ...] = SPLITS, task_types: tuple[str, ...] = TASK_TYPES, workers: int = 1,
) -> dict[str, list[str]]:
    """Write ``n`` games per split (or ``n[split]``) under ``out``; returns the game files per split."""
    out = Path(out)
    counts = n if isinstance(n, dict) else {s: n for s in splits}
    jobs = [(out, seed, s, i, task_types) for s in splits for i in range(counts[s])]
    if workers > 1 and len(jobs) > 1:
        # spawn: the parent may hold threads (Ray, torch) that make fork unsafe. An executor, not Pool: a worker
        # that dies fails the call instead of being replaced forever while map() waits.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            try:
                paths = list(pool.map(_job, jobs, chunksize=1))
            except BrokenProcessPool as error:
                raise RuntimeError(
                    "ALFWorld game generation: a worker process died. Workers start with 'spawn', which re-imports "
                    "the main script: if a script builds games (e.g. creates ALFWorldEnv on a fresh cache) at import "
                    "time, put that code under `if __name__ == \"__main__\":`, or generate with workers=1."
                ) from error
    else:
        paths = [_job(j) for j in jobs]
    result: dict[str, list[str]] = {s: [] for s in splits}
    for (_, _, split, _, _), path in zip(jobs, paths):
        if path is not None:
            result[split].append(path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (json_2.1.1/<split>/... is created inside)")
    parser.add_argument("--n", type=int, required=True, help="games per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", action="append", help=f"repeatable; default all of {list(SPLITS)}")
    parser.add_argument("--task-type", action="append", help=f"repeatable; default all of {list(TASK_TYPES)}")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    splits = tuple(dict.fromkeys(canonical_split(s) for s in args.split)) if args.split else SPLITS
    start = time.perf_counter()
    result = generate(args.out, args.n, args.seed, splits, canonical_task_types(args.task_type), args.workers)
    for split, paths in result.items():
        print(f"{split}: {len(paths)}/{args.n} games")
    print(f"wrote {sum(map(len, result.values()))} games to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0 if all(len(p) == args.n for p in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
