"""Cost of the signal-fidelity probe on the main job: probe seconds against the rest of the step, per task.

One run of `python -m opd_agents.train configs/alternating.yaml` (embedded zoo 0, built on first use) for `--steps`
steps with `fidelity.every=1`, so that every step is probed and both halves of each step are timed in the same run
on the same rollouts (this machine's speed drifts; two runs would not compare). The trainer logs `time/fidelity`
(the probe: the teacher's full-vocabulary answers on `fidelity.positions` loss tokens and the learner's two gradient
passes) and `time/step` (everything, the probe included). The probe's share of a run at the shipped rate is
mean(probe) / (every x mean(step without the probe)), per task and overall; an alternating run with an odd `every`
probes both tasks in turn, so the overall share averages the two tasks' probes over every step.
Evaluations are cut to a few episodes: only the training steps are read.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, main, print_table, save

from opd_agents.config import load_config
from opd_agents.run.metrics import read_metrics

CONFIG = ROOT / "configs" / "alternating.yaml"
TARGET = 0.05  # issue 43: the probe at the shipped rate costs under 5% of a step


def run_probed(steps: int, out: Path) -> list[dict[str, Any]]:
    """The main job for `steps` steps, every step probed; its metrics records of training steps."""
    command = [sys.executable, "-m", "opd_agents.train", str(CONFIG), f"run.steps={steps}", "fidelity.every=1",
               "fidelity.patience=0", "run.save_every=0", "run.eval_before=false", "eval.teacher_reference=false",
               "tasks.math.eval_episodes=4", "tasks.alfworld.eval_episodes=1", f"run.output_dir={out}",
               "run.name=fidelity_cost"]
    subprocess.run(command, cwd=ROOT, check=True, timeout=3600)
    return [r for r in read_metrics(out / "fidelity_cost" / "metrics.jsonl") if "time/fidelity" in r]


def summarise(records: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    rows = []
    for task in [*sorted({r["task"] for r in records}), "all"]:
        mine = [r for r in records if task in ("all", r["task"])]
        probe = statistics.mean(r["time/fidelity"] for r in mine)
        rest = statistics.mean(r["time/step"] - r["time/fidelity"] for r in mine)
        rows.append({"task": task, "steps": len(mine), "probe_s": probe, "step_without_probe_s": rest,
                     "probe_over_step": probe / rest, "share_at_every": probe / (every * rest),
                     "positions": statistics.mean(r["fidelity/num_positions"] for r in mine)})
    return rows


def benchmark(args: argparse.Namespace) -> None:
    every = load_config(CONFIG).fidelity.every
    if not every:
        raise SystemExit(f"{CONFIG} has fidelity.every = 0: nothing to measure the shipped rate against")
    steps = 4 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="fidelity_cost_") as tmp:
        start = time.perf_counter()
        records = run_probed(steps, Path(tmp))
        wall = time.perf_counter() - start
    rows = summarise(records, every)
    print_table(f"fidelity probe vs the rest of the step (configs/alternating.yaml, fidelity.every = {every} shipped; "
                f"{steps} steps, each probed)",
                ["task", "steps", "probe s", "step w/o probe s", "probe / step", f"share at every={every}",
                 "positions"],
                [[r["task"], r["steps"], r["probe_s"], r["step_without_probe_s"], r["probe_over_step"],
                  r["share_at_every"], r["positions"]] for r in rows])
    overall = rows[-1]["share_at_every"]
    print(f"probe share of a run at fidelity.every = {every}: {overall:.1%} (target < {TARGET:.0%})")
    save("fidelity_cost" + ("_quick" if args.quick else ""),
         {"config": "configs/alternating.yaml", "every": every, "steps": steps, "run_wall_s": wall, "rows": rows,
          "share_at_every": overall, "target": TARGET, "meets_target": overall < TARGET})


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="training steps, every one probed")


if __name__ == "__main__":
    main(__doc__, benchmark, add_args=add_args)
