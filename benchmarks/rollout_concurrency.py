"""Step time of the main job with every episode of a worker's share in flight vs lock-step waves of 8 episodes.

`rollout.max_concurrent_episodes: null` (the default: no waves) against `8` (the old `envs_per_worker` default), each
through `python -m opd_agents.train configs/alternating.yaml` (embedded zoo 0, built on first use) for `--steps`
steps, the two settings in the order A B, B A, A B, ... (`--rounds` runs each), so that neither always runs first on a
machine whose load drifts. Per setting and task: the medians over its runs' steps (each task's first step in a run
dropped: env set-up) of the trainer's `time/rollout` + `time/sync`, the phases the setting changes, and of
`time/step`. The teacher and learner phases run the same code whatever the setting, so the comparison step time is
the setting's rollout + sync plus the teacher + learner median pooled over both settings: on a shared machine the
unaffected phases' noise (seconds) would otherwise swamp the effect. The target: no-waves step time at most 5% above
the waves'. Evaluations are cut to a few episodes and the probe is off: only the training steps are read.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT, main, print_table, save, train_steps

CONFIG = ROOT / "configs" / "alternating.yaml"
SETTINGS = {"all in flight (null)": "null", "waves of 8": "8"}
TARGET = 1.05


def run_steps(setting: str, steps: int, out: Path, name: str) -> tuple[list[dict[str, Any]], float]:
    return train_steps(CONFIG, [f"run.steps={steps}", "run.save_every=0", "run.eval_before=false",
                                "eval.teacher_reference=false", "fidelity.every=0", "tasks.math.eval_episodes=4",
                                "tasks.alfworld.eval_episodes=1", f"rollout.max_concurrent_episodes={setting}"],
                       out, name, timeout_s=3600)


def benchmark(args: argparse.Namespace) -> None:
    steps, rounds = (4, 1) if args.quick else (args.steps, args.rounds)
    records: dict[str, list[dict[str, Any]]] = {label: [] for label in SETTINGS}
    walls: dict[str, list[float]] = {label: [] for label in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="rollout_concurrency_") as tmp:
        for r in range(rounds):
            order = list(SETTINGS.items()) if r % 2 == 0 else list(SETTINGS.items())[::-1]
            for i, (label, setting) in enumerate(order):
                got, wall = run_steps(setting, steps, Path(tmp), f"r{r}-s{i}")
                records[label] += got
                walls[label].append(wall)
    rows = []
    for task in sorted({r["task"] for recs in records.values() for r in recs}):
        unaffected = statistics.median(r["time/teacher"] + r["time/learner"] for recs in records.values()
                                       for r in recs if r["task"] == task)
        for label, recs in records.items():
            mine = [r for r in recs if r["task"] == task]
            affected = statistics.median(r["time/rollout"] + r["time/sync"] for r in mine)
            rows.append({"setting": label, "task": task, "steps": len(mine),
                         "step_s": statistics.median(r["time/step"] for r in mine), "rollout_sync_s": affected,
                         "teacher_learner_pooled_s": unaffected, "comparison_step_s": affected + unaffected})
    base = {r["task"]: r for r in rows if r["setting"] == "waves of 8"}
    for r in rows:
        r["step_vs_waves"] = r["comparison_step_s"] / base[r["task"]]["comparison_step_s"]
    print_table(f"main-job step time: rollout.max_concurrent_episodes (configs/alternating.yaml, {steps} steps x "
                f"{rounds} runs per setting, medians)",
                ["setting", "task", "steps", "measured step s", "rollout+sync s", "teacher+learner s (pooled)",
                 "comparison step s", "vs waves"],
                [[r["setting"], r["task"], r["steps"], r["step_s"], r["rollout_sync_s"], r["teacher_learner_pooled_s"],
                  r["comparison_step_s"], r["step_vs_waves"]] for r in rows])
    worst = max(r["step_vs_waves"] for r in rows if r["setting"] != "waves of 8")
    print(f"no waves: step time at most {worst:.3f}x the waves' (target <= {TARGET})")
    save("rollout_concurrency" + ("_quick" if args.quick else ""),
         {"config": "configs/alternating.yaml", "steps": steps, "rounds": rounds, "rows": rows,
          "run_wall_s": walls, "worst_ratio": worst, "target": TARGET, "meets_target": worst <= TARGET})


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=4, help="runs per setting, in alternating order")


if __name__ == "__main__":
    main(__doc__, benchmark, add_args=add_args)
