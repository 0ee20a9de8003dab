"""Official ALFWorld games played by the embedded models in either command vocabulary: `python -m
experiments.official_alfworld --checkpoint CKPT [options]`.

    python -m experiments.official_alfworld --checkpoint runs/main_job/z0-s0/checkpoints/step_60
        [--config configs/alternating.yaml] [--data ../shared/data/alfworld] [--split valid_seen]
        [--vocabularies native unified] [--episodes N] [--set KEY=VALUE ...]
        [--out experiments/results/official_alfworld]

Per command vocabulary (the env's `command_vocabulary`: `native` plays the data's own text, `unified` the alfworld ≥
0.4 grammar the zoo's models were trained on; docs/real-data.md), the two commands a user runs, as subprocesses:

    python -m opd_agents.evaluate CONFIG --teacher --out OUT/runs/<vocabulary>-before OVERRIDES [--set ...]
    python -m opd_agents.evaluate CONFIG --checkpoint CKPT --out OUT/runs/<vocabulary>-after OVERRIDES [--set ...]

the first plays the config's student before training and each task's teacher, the second the checkpoint, all on the
same games: OVERRIDES point the ALFWorld task's evaluation at `--split` of `--data` in that vocabulary
(`tasks.alfworld.eval_env_kwargs`), every game of it unless `--episodes` asks for a seeded stratified sample
(`tasks.alfworld.eval_episodes`), and cut math's evaluation to one problem (this measures ALFWorld only). A finished
invocation (its `eval.json` present) is reused, so an interrupted measurement resumes.

Writes `OUT/summary.json` and `OUT/summary.md`: per vocabulary and policy (before, after, teacher), the success on
the games and per task type ± binomial standard error; paired comparisons on the same games (mean difference in
points, its paired SE, two-sided p of the paired t-test with n − 1 degrees of freedom, `experiments.grid_stats`):
after against before in each vocabulary, and unified against native for each policy; and each invocation's command,
commit and wall time.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from envs.user_files import MIB, UserFileError
from experiments.grid_aggregate import stored_json
from experiments.grid_stats import paired_test
from opd_agents.run.provenance import code_version, portable_path
from opd_agents.run.rundir import atomic_write_json, atomic_write_text

POLICIES = ("before", "after", "teacher")
VOCABULARIES = ("native", "unified")
RESULTS = Path("experiments/results/official_alfworld")

STORED_MAX_BYTES = 64 * MIB  # an evaluation's per-game outcomes


def overrides(data: Path, split: str, vocabulary: str, episodes: int) -> list[str]:
    """The config overrides that point the ALFWorld task's evaluation at `split` of `data` in `vocabulary`."""
    kwargs = f"{{split: {split}, data_path: {data}, command_vocabulary: {vocabulary}}}"
    return [f"tasks.alfworld.eval_env_kwargs={kwargs}", f"tasks.alfworld.eval_episodes={episodes}",
            "tasks.math.eval_episodes=1"]


def run_command(command: list[str], timeout: float) -> None:
    subprocess.run(command, check=True, timeout=timeout)


def evaluate(args: argparse.Namespace, vocabulary: str, side: str, episodes: int) -> dict[str, Any]:
    """One `opd_agents.evaluate` invocation (side: before = the config's student and the teachers, after = the
    checkpoint), unless its folder already holds a finished one; its folder, command and wall seconds."""
    out = args.out / "runs" / f"{vocabulary}-{side}"
    command = [sys.executable, "-m", "opd_agents.evaluate", str(args.config)]
    command += ["--teacher"] if side == "before" else ["--checkpoint", str(args.checkpoint)]
    command += ["--out", str(out), *overrides(args.data, args.split, vocabulary, episodes), *args.set]
    shown = [portable_path(c) if Path(c).is_absolute() else c for c in command[1:]]
    record = {"dir": portable_path(out), "command": "python " + " ".join(shown)}
    if (out / "eval.json").is_file():
        return record | {"reused": True}
    started = time.monotonic()
    run_command(command, args.timeout)
    return record | {"seconds": round(time.monotonic() - started, 1), "reused": False}


def outcomes(run: Path, policy: str) -> tuple[list[int], list[int] | None]:
    """The ALFWorld per-game outcomes (0 / 1) a policy got in one invocation's folder, and the game indices they
    belong to (None = every game of the split, in order)."""
    if policy == "teacher":
        stored = stored_json(run / "eval" / "teacher_items.json", "teacher evaluation items", STORED_MAX_BYTES)
    else:
        stored = stored_json(run / "eval" / "step_0.json", "evaluation", STORED_MAX_BYTES)
    items = stored.get("items", {}).get("alfworld")
    if not isinstance(items, list) or not items:
        raise UserFileError(f"{run} holds no per-game ALFWorld outcomes for {policy}: rerun that evaluation")
    return items, stored.get("item_ids", {}).get("alfworld")


def rate(values: list[int]) -> dict[str, float]:
    p = sum(values) / len(values)
    return {"success": p, "se": math.sqrt(p * (1 - p) / len(values)), "games": len(values)}


def summarize(per_game: dict[str, dict[str, list[int]]], types: list[str]) -> dict[str, Any]:
    """per_game: vocabulary -> policy -> outcomes on the same games, whose task types are `types`."""
    table: dict[str, Any] = {}
    for vocabulary, policies in per_game.items():
        table[vocabulary] = {}
        for policy, values in policies.items():
            by_type = {t: [v for v, g in zip(values, types) if g == t] for t in sorted(set(types))}
            table[vocabulary][policy] = rate(values) | {"type": {t: rate(v) for t, v in by_type.items()}}

    def test(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
        return {k: v for k, v in paired_test(a, b).items() if k != "runs"}  # the keys are just the game order

    def compare(a: list[int], b: list[int]) -> dict[str, Any]:
        return test(dict(enumerate(a)), dict(enumerate(b))) | {
            "type": {t: test({i: a[i] for i, g in enumerate(types) if g == t},
                             {i: b[i] for i, g in enumerate(types) if g == t}) for t in sorted(set(types))}}

    pairs: dict[str, Any] = {}
    for vocabulary, policies in per_game.items():
        if {"before", "after"} <= set(policies):
            pairs[f"{vocabulary}: after vs before"] = compare(policies["after"], policies["before"])
    if set(VOCABULARIES) <= set(per_game):
        for policy in POLICIES:
            if all(policy in per_game[v] for v in VOCABULARIES):
                pairs[f"{policy}: unified vs native"] = compare(per_game["unified"][policy],
                                                                per_game["native"][policy])
    return {"success": table, "paired": pairs}


def _pct(x: dict[str, Any]) -> str:
    return f"{100 * x['success']:.1f} ± {100 * x['se']:.1f}"


def _diff(x: dict[str, Any]) -> str:
    if x.get("se") is None:
        return "–"
    p = "" if x.get("p") is None else f", p = {x['p']:.3g}"
    return f"{100 * x['diff']:+.1f} ± {100 * x['se']:.1f}{p}"


def to_markdown(summary: dict[str, Any]) -> str:
    table = summary["success"]
    types = sorted({t for v in table.values() for p in v.values() for t in p["type"]})
    lines = [f"# Official ALFWorld `{summary['split']}`: {summary['games']} games, by command vocabulary", "",
             f"Checkpoint `{summary['checkpoint']}`, config `{summary['config']}`, data `{summary['data']}`. Success "
             "in % ± binomial SE; paired differences in points ± paired SE, two-sided p (paired t-test, n − 1 df). "
             "`before`: the config's student, untrained; `after`: the checkpoint; `teacher`: the ALFWorld task's "
             "teacher played as a policy.", "",
             "| vocabulary | policy | all games | " + " | ".join(f"`{t}`" for t in types) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in types) + " |"]
    for vocabulary, policies in table.items():
        for policy, row in policies.items():
            cells = [f"{_pct(row['type'][t])} ({row['type'][t]['games']})" if t in row["type"] else "–"
                     for t in types]
            lines.append(f"| {vocabulary} | {policy} | {_pct(row)} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | all games | " + " | ".join(f"`{t}`" for t in types) + " |",
              "| --- | --- | " + " | ".join("---" for _ in types) + " |"]
    for name, x in summary["paired"].items():
        lines.append(f"| {name} | {_diff(x)} | " + " | ".join(_diff(x["type"].get(t, {})) for t in types) + " |")
    return "\n".join(lines) + "\n"


def game_types(data: Path, split: str, ids: list[int] | None, n: int) -> list[str]:
    """The task type of each evaluated game: game `ids[i]` (or i) of the split's sorted game list."""
    from envs.alfworld.data import find_games, read_task_type

    games = find_games(data, split)
    return [read_task_type(Path(games[i])) for i in (range(n) if ids is None else ids)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.official_alfworld", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the trained student (a checkpoint folder)")
    parser.add_argument("--config", type=Path, default=Path("configs/alternating.yaml"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/alfworld"),
                        help="the ALFWorld data root (json_2.1.1/...)")
    parser.add_argument("--split", default="valid_seen")
    parser.add_argument("--vocabularies", nargs="+", choices=VOCABULARIES, default=list(VOCABULARIES))
    parser.add_argument("--episodes", type=int, help="games per evaluation (default: every game of the split)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every invocation, e.g. run.zoo_seed=1 for a zoo-1 checkpoint")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per evaluate invocation")
    args = parser.parse_args(argv)
    from envs.alfworld.data import find_games

    episodes = args.episodes or len(find_games(args.data, args.split))
    invocations: list[dict[str, Any]] = []
    per_game: dict[str, dict[str, list[int]]] = {}
    played: list[tuple[list[int] | None, int]] = []  # (game ids, count) of every policy: all must be the same
    for vocabulary in args.vocabularies:
        per_game[vocabulary] = {}
        for side in ("before", "after"):
            invocations.append(evaluate(args, vocabulary, side, episodes) | {"vocabulary": vocabulary, "side": side})
            run = args.out / "runs" / f"{vocabulary}-{side}"
            for policy in (("before", "teacher") if side == "before" else ("after",)):
                values, ids = outcomes(run, policy)
                played.append((ids, len(values)))
                if played[-1] != played[0]:
                    raise UserFileError(f"{run}: {policy} played other games than {played[0][1]} the other "
                                        "policies played; remove that folder and rerun")
                per_game[vocabulary][policy] = values
    ids, n = played[0]
    summary = {"checkpoint": portable_path(args.checkpoint), "config": portable_path(args.config),
               "data": portable_path(args.data), "split": args.split, "games": n, "item_ids": ids,
               "code": code_version(), "invocations": invocations,
               **summarize(per_game, game_types(args.data, args.split, ids, n))}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "summary.json", summary)
    text = to_markdown(summary)
    atomic_write_text(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
