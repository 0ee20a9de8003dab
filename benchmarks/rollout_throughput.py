"""Rollout throughput with 1 vs 2 Ray rollout workers, and where one training step's time goes.

Config: `configs/alternating.yaml` (the CPU default: math + ALFWorld alternating, 2 rollout workers, 8 envs per
worker, K = 32) with its `zoo:` models replaced by randomly initialised `build_tiny_model`s of the zoo recipe's sizes
(student 2 layers h128, math teacher 3 layers h128, ALFWorld teacher 4 layers h192) on a tokenizer trained on a
little env text: the zoo is not built here. Random models never emit the end-of-turn token and never win, so every
response has `max_new_tokens` tokens and every ALFWorld episode lasts its 20 turns (the longest case).
  throughput  `RolloutGroup` (Ray actors, 1 CPU and 1 torch thread each) with 1 and with 2 workers on a 2-CPU Ray
              cluster: one step's request per call (prompts_per_step × group_size episodes), after a warm-up call
              that builds the env pools; episodes/s and response tokens/s are the group's own `rollout/*` metrics,
              median over the timed calls. ALFWorld runs with the config's env kwargs (`expert: null`) and with
              the env's own default, `expert="planner"` (fast-downward replans every step). Math also runs calls of
              MATH_SCALE x the step's prompts, to tell per-call fixed costs from per-episode work.
  phases      `python -m opd_agents.train configs/alternating.yaml` (the main entry point, 2 rollout workers) for
              STEPS steps; the trainer's own `time/*` metrics per step, first step of each task dropped (env set-up).
  rollout split  one step's request per task through `LocalRolloutGroup` (the same worker code in this process,
              1 thread) with `policy.generate` and each env's `reset`/`step` timed from outside: the rest of the
              rollout time is prompt building, tokenising, decoding and bookkeeping.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import print_table, save, save_tiny_model, train_env_tokenizer
from _common import main as cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "alternating.yaml"
STEPS = 6
MATH_SCALE = 8  # the extra math row's request: 8 x prompts_per_step prompts per call


def overrides(models: Path, out: Path) -> list[str]:
    """The default config on the benchmark's models; cheap evaluation (not measured) on the train split."""
    return [f"student.path={models / 'student'}", f"teachers.math_teacher.model={models / 'math-teacher'}",
            f"teachers.alfworld_teacher.model={models / 'alfworld-teacher'}", f"run.output_dir={out}",
            "run.name=phases", f"run.steps={STEPS}", "run.eval_before=false", "run.save_every=0",
            "eval.teacher_reference=false", "tasks.math.eval_episodes=1", "tasks.alfworld.eval_episodes=1",
            "tasks.alfworld.eval_env_kwargs={split: train}", "logging.progress=false", "logging.tensorboard=false"]


def throughput(base: list[str], timed_calls: dict[str, int]) -> list[dict[str, Any]]:
    import ray

    from opd_agents.config import load_config
    from opd_agents.rollout.group import RolloutGroup, init_ray

    rows = []
    for expert in (None, "planner"):
        for workers in (1, 2):
            extra = [] if expert is None else [f"tasks.alfworld.env_kwargs.expert={expert}"]
            cfg = load_config(CONFIG, base + [f"rollout.num_workers={workers}"] + extra)
            init_ray(cfg.ray)
            group = RolloutGroup.from_config(cfg)
            for task in cfg.tasks:
                if task.name == "math" and expert is not None:
                    continue  # the expert is an ALFWorld setting
                group.rollout(task, num_prompts=1)  # warm-up: env pools, first games, grading workers
                sizes = {task.name + (f" (expert={expert})" if expert else ""): None}
                if task.name == "math":  # does the shortfall of short calls shrink when a call does 8x the work?
                    sizes[f"math ({MATH_SCALE}x prompts per call)"] = MATH_SCALE * cfg.rollout.prompts_per_step
                for label, num_prompts in sizes.items():
                    calls = [group.rollout(task, num_prompts=num_prompts).metrics
                             for _ in range(timed_calls[task.name])]
                    rows.append({"task": label, "workers": workers, "calls": calls,
                                 **{k: statistics.median(c[f"rollout/{k}"] for c in calls)
                                    for k in ("episodes_per_s", "tokens_per_s", "time_s", "episodes")}})
                    print(rows[-1] | {"calls": len(calls)}, flush=True)
            group.shutdown()
    ray.shutdown()  # the trainer run below starts its own cluster
    return rows


class Stopwatch:
    """Seconds spent inside wrapped methods, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, name: str, label: str) -> None:
        method = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(obj, name, timed)


def rollout_split(base: list[str]) -> list[dict[str, Any]]:
    from opd_agents.config import load_config
    from opd_agents.rollout.group import LocalRolloutGroup

    cfg = load_config(CONFIG, base)
    group = LocalRolloutGroup.from_config(cfg)
    watch = Stopwatch()
    watch.wrap(group.worker.policy, "generate", "generation")
    rows = []
    for task in cfg.tasks:
        group.rollout(task, num_prompts=1)  # builds the env pool
        for env, _ in group.worker.pools[(task.name, False)]:
            watch.wrap(env, "reset", "env reset + step")
            watch.wrap(env, "step", "env reset + step")
        watch.seconds.clear()
        start = time.perf_counter()
        group.rollout(task)
        total = time.perf_counter() - start
        parts = dict(watch.seconds) | {"prompts, tokenising, bookkeeping": total - sum(watch.seconds.values())}
        rows.append({"task": task.name, "total_s": total, "parts_s": parts})
        print(rows[-1], flush=True)
    group.shutdown()
    return rows


def phases(base: list[str], out: Path) -> list[dict[str, Any]]:
    """Run the trainer through its command line and read its per-step `time/*` metrics."""
    subprocess.run([sys.executable, "-m", "opd_agents.train", str(CONFIG), *base], check=True, cwd=CONFIG.parents[1])
    records = [json.loads(line) for line in (out / "phases" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step" in r]
    seen: set[str] = set()
    kept = []
    for r in steps:  # drop the first step of each task: it creates the env pools and loads the first games
        if r["task"] in seen:
            kept.append({k: v for k, v in r.items() if k.startswith("time/") or k in ("step", "task")})
        seen.add(r["task"])
    return kept


def benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        tok = train_env_tokenizer(models / "tokenizer")
        for name in ("student", "math-teacher", "alfworld-teacher"):
            save_tiny_model(tok, models / name, name)
        out = Path(tmp) / "runs"
        # --quick: ALFWorld episodes of 3 turns instead of 20, fewer timed calls, no trainer run.
        base = overrides(models, out) + (["tasks.alfworld.max_turns=3"] if args.quick else [])
        calls = {"math": 2, "alfworld": 1} if args.quick else {"math": 5, "alfworld": 2}
        result: dict[str, Any] = {"config": str(CONFIG.relative_to(CONFIG.parents[1])),
                                  "overrides": [o.replace(tmp, "<tmp>") for o in base]}
        result["throughput"] = throughput(base, calls)
        result["rollout_split"] = rollout_split(base)
        if not args.quick:
            result["phases"] = phases(base, out)
    save("rollout_throughput" + ("_quick" if args.quick else ""), result)
    report(result)


def report(result: dict[str, Any]) -> None:
    base = {r["task"]: r for r in result["throughput"] if r["workers"] == 1}
    print_table("rollout throughput (median over timed calls of one step's episodes; Ray, 1 CPU per worker)",
                ["task", "workers", "episodes/s", "tokens/s", "s per call", "× vs 1 worker"],
                [[r["task"], r["workers"], r["episodes_per_s"], r["tokens_per_s"], r["time_s"],
                  r["episodes_per_s"] / base[r["task"]]["episodes_per_s"]] for r in result["throughput"]])
    for r in result["rollout_split"]:
        print_table(f"{r['task']}: one step's rollout in-process ({r['total_s']:.1f} s)", ["part", "s", "share"],
                    [[k, v, f"{v / r['total_s']:.0%}"] for k, v in r["parts_s"].items()])
    share_table(result.get("phases", []))


def share_table(steps: list[dict[str, Any]]) -> None:
    keys = ("time/rollout", "time/teacher", "time/learner", "time/sync")
    for task in sorted({s["task"] for s in steps}):
        rows = [s for s in steps if s["task"] == task]
        median: Callable[[str], float] = lambda k: statistics.median(s[k] for s in rows)  # noqa: E731
        step = median("time/step")
        print_table(f"{task}: one training step (trainer's time/* metrics, median of {len(rows)} steps, "
                    f"{step:.1f} s per step)", ["phase", "s", "share"],
                    [[k.split("/")[1], median(k), f"{median(k) / step:.0%}"] for k in keys]
                    + [["other (logging, metrics)", step - sum(median(k) for k in keys), ""]])


if __name__ == "__main__":
    cli(__doc__, benchmark)
