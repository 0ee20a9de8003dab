"""Steps per hour and per-side busy fractions of the sync and async pipelines (`run.pipeline`), side by side.

Each setting — sync, async with `run.max_staleness` 1 and 2 — runs `python -m opd_agents.train CONFIG` for `--steps`
steps, `--rounds` runs each, in the order A B C, C B A, … so that none always runs first on a machine whose load
drifts. Resources: one rollout worker on its own Ray CPU (`rollout.num_workers=1`, `num_cpus_per_worker=1`), the
learner and the in-process teacher in the driver, so on 2 cores the rollout side and the learner side each have one;
the ceiling of overlapping two sides is 2x. Evaluations are cut to a few episodes, the probe is off and the only
checkpoint is the last step's (each would be a barrier): only the training steps are read. Per setting and config:
steps per hour = 3600 / the median step wall (each task's first step of a run dropped: env set-up and warm caches);
busy fractions = each stage's median seconds per step over that wall: roll-out (`time/rollout` + `time/sync`),
teacher (`time/teacher`) and learner (`time/learner` + `time/publish`, the weights' copy for the rollout side). The
sync step is their sum; async can at best bring it down to the slowest stage. Target: async at least 1.5x the sync
steps per hour.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT, main, print_table, save, train_steps

from opd_agents.config import load_config

CONFIGS = {"alternating": ROOT / "configs" / "alternating.yaml", "alfworld": ROOT / "configs" / "alfworld.yaml"}
SETTINGS = {"sync": ["run.pipeline=sync"], "async n=1": ["run.pipeline=async", "run.max_staleness=1"],
            "async n=2": ["run.pipeline=async", "run.max_staleness=2"]}
LAYOUT = ["rollout.num_workers=1", "rollout.num_cpus_per_worker=1", "ray.num_cpus=2"]
QUIET = ["run.save_every=0", "run.eval_before=false", "eval.teacher_reference=false", "fidelity.every=0"]
STAGES = {"roll_out": ("rollout", "sync"), "teacher": ("teacher",), "learner": ("learner", "publish")}
TARGET = 1.5


def run_steps(config: Path, setting: list[str], steps: int, out: Path, name: str) -> tuple[list[dict[str, Any]], float]:
    evals = [f"tasks.{t.name}.eval_episodes=1" for t in load_config(config).tasks]
    return train_steps(config, [f"run.steps={steps}", *QUIET, *LAYOUT, *evals, *setting], out, name)


def _side(r: dict[str, Any], keys: tuple[str, ...]) -> float:
    return sum(float(r.get(f"time/{k}", 0.0)) for k in keys)


def benchmark(args: argparse.Namespace) -> None:
    steps, rounds = (4, 1) if args.quick else (args.steps, args.rounds)
    rows, walls = [], {}
    with tempfile.TemporaryDirectory(prefix="pipeline_") as tmp:
        for config_name in args.configs:
            records: dict[str, list[dict[str, Any]]] = {label: [] for label in SETTINGS}
            for r in range(rounds):
                order = list(SETTINGS.items()) if r % 2 == 0 else list(SETTINGS.items())[::-1]
                for i, (label, setting) in enumerate(order):
                    got, wall = run_steps(CONFIGS[config_name], setting, steps, Path(tmp), f"{config_name}-r{r}-s{i}")
                    records[label] += got
                    walls.setdefault(f"{config_name}/{label}", []).append(wall)
            for label, recs in records.items():
                step_s = statistics.median(r["time/step"] for r in recs)
                rows.append({
                    "config": config_name, "setting": label, "steps": len(recs), "step_s": step_s,
                    "steps_per_hour": 3600.0 / step_s,
                    **{f"{stage}_busy": statistics.median(_side(r, keys) for r in recs) / step_s
                       for stage, keys in STAGES.items()},
                    "staleness_mean": statistics.fmean(float(r.get("pipeline/staleness", 0)) for r in recs)})
    base = {r["config"]: r["steps_per_hour"] for r in rows if r["setting"] == "sync"}
    for r in rows:
        r["speedup_vs_sync"] = r["steps_per_hour"] / base[r["config"]]
    print_table(f"sync vs async pipeline ({steps} steps x {rounds} runs per setting, medians; rollout worker and "
                "driver (teacher, learner) on one core each)",
                ["config", "setting", "steps", "step s", "steps / h", "roll-out busy", "teacher busy", "learner busy",
                 "mean staleness", "vs sync"],
                [[r["config"], r["setting"], r["steps"], r["step_s"], r["steps_per_hour"], r["roll_out_busy"],
                  r["teacher_busy"], r["learner_busy"], r["staleness_mean"], r["speedup_vs_sync"]] for r in rows])
    best = min(max(r["speedup_vs_sync"] for r in rows if r["config"] == c) for c in base)
    print(f"async: at least {best:.2f}x the sync steps per hour on every config (target >= {TARGET})")
    save("pipeline" + ("_quick" if args.quick else ""),
         {"configs": args.configs, "steps": steps, "rounds": rounds, "layout": LAYOUT, "rows": rows,
          "run_wall_s": walls, "best_speedup": best, "target": TARGET, "meets_target": best >= TARGET})


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting, in alternating order")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))


if __name__ == "__main__":
    main(__doc__, benchmark, add_args=add_args)
