"""Rollout throughput with 1 vs 2 Ray rollout workers, and where one training step's time goes.

Config: `configs/alternating.yaml` (the CPU default: math + ALFWorld alternating, 2 rollout workers, 8 envs per
worker, K = 32) with its `zoo:` models replaced by randomly initialised `build_tiny_model`s of the zoo recipe's sizes
(student 2 layers h128, math teacher 3 layers h128, ALFWorld teacher 4 layers h192) on a tokenizer trained on a
little env text: the zoo is not built here. Random models never emit the end-of-turn token and never win, so every
response has `max_new_tokens` tokens and every ALFWorld episode lasts its 20 turns (the longest case).
  throughput  `RolloutGroup`s (Ray actors, 1 CPU and 1 torch thread each) of 1 and of 2 workers, both alive at
              once, their calls alternating (1, 2, 2, 1, ...) so that the shared host's drifting speed hits both
              alike: one step's request per call (prompts_per_step x group_size episodes), after a warm-up call
              that builds the env pools; episodes/s and response tokens/s are the group's own `rollout/*` metrics,
              median over the timed calls, next to the actors' CPU seconds per episode, their busy fraction
              (actor CPU / (workers x call time)) and spread (1 - min/max of the actors' CPU seconds in a call).
              ALFWorld runs with the config's env kwargs (`expert: null`) and with the env's own default,
              `expert="planner"` (fast-downward replans every step). Math also runs calls of MATH_SCALE x the
              step's prompts, to tell per-call fixed costs from per-episode work.
  plain processes  the math rows' requests without Ray: 1 vs 2 plain processes, each running its share through the
              same worker code in-process (`LocalRolloutGroup`), calls alternating likewise: this host's own
              scaling for two generation-bound workers, the ceiling the Ray rows are read against.
  phases      `python -m opd_agents.train configs/alternating.yaml` (the main entry point, 2 rollout workers) for
              STEPS steps; the trainer's own `time/*` metrics per step, first step of each task dropped (env set-up).
  rollout split  one step's request per task through `LocalRolloutGroup` (the same worker code in this process,
              1 thread) with `policy.generate` and each env's `reset`/`step` timed from outside: the rest of the
              rollout time is prompt building, tokenising, decoding and bookkeeping.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import print_table, save, save_tiny_model, train_env_tokenizer
from _common import main as cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "alternating.yaml"
STEPS = 6
MATH_SCALE = 8  # the extra math row's request: 8 x prompts_per_step prompts per call
WORKERS = (1, 2)
ROW_KEYS = ("episodes_per_s", "tokens_per_s", "time_s", "episodes", "busy", "spread", "actor_cpu_s_per_episode",
            "steal_s")


def overrides(models: Path, out: Path) -> list[str]:
    """The default config on the benchmark's models; cheap evaluation (not measured) on the train split."""
    return [f"student.path={models / 'student'}", f"teachers.math_teacher.model={models / 'math-teacher'}",
            f"teachers.alfworld_teacher.model={models / 'alfworld-teacher'}", f"run.output_dir={out}",
            "run.name=phases", f"run.steps={STEPS}", "run.eval_before=false", "run.save_every=0",
            "eval.teacher_reference=false", "tasks.math.eval_episodes=1", "tasks.alfworld.eval_episodes=1",
            "tasks.alfworld.eval_env_kwargs={split: train}", "logging.progress=false", "logging.tensorboard=false"]


def throughput(base: list[str], rounds: dict[str, int]) -> list[dict[str, Any]]:
    import ray

    from opd_agents.config import load_config
    from opd_agents.rollout.group import RolloutGroup, init_ray

    rows = []
    for expert in (None, "planner"):
        extra = [] if expert is None else [f"tasks.alfworld.env_kwargs.expert={expert}"]
        # Both groups live at once (3 logical CPUs; only one group works at a time, so at most 2 busy actors on the
        # 2 cores) and their calls alternate 1, 2, 2, 1, ...: the shared host's speed drifts by up to ~1.7x between
        # calls, and timing all 1-worker calls before all 2-worker calls measured that drift, not the scaling.
        cfgs = {w: load_config(CONFIG, base + [f"rollout.num_workers={w}", f"ray.num_cpus={sum(WORKERS)}"] + extra)
                for w in WORKERS}
        init_ray(cfgs[1].ray)
        groups = {w: RolloutGroup.from_config(cfg) for w, cfg in cfgs.items()}
        for task in cfgs[1].tasks:
            if task.name == "math" and expert is not None:
                continue  # the expert is an ALFWorld setting
            for group in groups.values():
                group.rollout(task, num_prompts=1)  # warm-up: env pools, first games, grading workers
            sizes = (math_sizes(cfgs[1].rollout.prompts_per_step) if task.name == "math"
                     else {task.name + (f" (expert={expert})" if expert else ""): cfgs[1].rollout.prompts_per_step})
            for label, num_prompts in sizes.items():
                calls: dict[int, list[dict[str, float]]] = {w: [] for w in WORKERS}
                for r in range(rounds[task.name]):
                    for w in WORKERS if r % 2 == 0 else WORKERS[::-1]:
                        calls[w].append(timed_call(groups[w], task, num_prompts))
                for w in WORKERS:
                    rows.append({"task": label, "workers": w, "calls": calls[w],
                                 **{k: statistics.median(c[k] for c in calls[w]) for k in ROW_KEYS}})
                    print(rows[-1] | {"calls": len(calls[w])}, flush=True)
        for group in groups.values():
            group.shutdown()
    ray.shutdown()  # the trainer run below starts its own cluster
    return rows


def math_sizes(prompts_per_step: int) -> dict[str, int]:
    """The math rows' request sizes: one step's, and MATH_SCALE x that (do short calls fall short of long ones?)."""
    return {"math": prompts_per_step, f"math ({MATH_SCALE}x prompts per call)": MATH_SCALE * prompts_per_step}


def timed_call(group: Any, task: Any, num_prompts: int) -> dict[str, float]:
    """One rollout call: the group's `rollout/*` metrics (prefix dropped), its actors' CPU seconds (all their
    threads; `busy` = actor CPU / (workers x call seconds)), `spread` = 1 - min/max of the actors' CPU seconds (the
    share of the call the least loaded worker sat idle, waiting for the other), and the CPU seconds the hypervisor
    stole from this VM meanwhile."""
    import ray

    def actor_cpu() -> list[float]:
        return ray.get([w.__ray_call__.remote(lambda _: time.process_time()) for w in group.workers])

    before, steal = actor_cpu(), stolen_s()
    metrics = {k.split("/", 1)[1]: v for k, v in group.rollout(task, num_prompts=num_prompts).metrics.items()}
    cpus = [after - b for after, b in zip(actor_cpu(), before)]
    return metrics | {"busy": sum(cpus) / (len(cpus) * metrics["time_s"]), "spread": 1 - min(cpus) / max(cpus),
                      "actor_cpu_s_per_episode": sum(cpus) / metrics["episodes"], "steal_s": stolen_s() - steal}


def stolen_s() -> float:
    """CPU seconds the hypervisor gave to others (all CPUs; the `steal` column of /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _plain_worker(overrides_: list[str], conn: Connection) -> None:
    """A `LocalRolloutGroup` (the Ray actor's worker code, in-process, 1 torch thread) in a plain process: runs each
    math request size received on `conn` and replies (wall s, CPU s, episodes); None ends it."""
    from opd_agents.config import load_config
    from opd_agents.rollout.group import LocalRolloutGroup

    cfg = load_config(CONFIG, overrides_)
    group = LocalRolloutGroup.from_config(cfg)
    task = cfg.task("math")
    group.rollout(task, num_prompts=1)
    conn.send("ready")
    while (num_prompts := conn.recv()) is not None:
        cpu, start = time.process_time(), time.perf_counter()
        episodes = len(group.rollout(task, num_prompts=num_prompts).episodes)
        conn.send((time.perf_counter() - start, time.process_time() - cpu, episodes))
    group.shutdown()


def plain_processes(base: list[str], sizes: dict[str, int], rounds: int) -> list[dict[str, Any]]:
    """The math rows without Ray: 1 vs 2 plain processes, each running its share of the request through the worker
    code in-process, calls alternating as in `throughput`. Their ratio is what this host gives two
    generation-bound workers, whatever schedules them."""
    ctx = multiprocessing.get_context("spawn")  # not fork: the parent already runs torch (and ran Ray) threads
    pipes: dict[int, list[Connection]] = {w: [] for w in WORKERS}
    procs = []
    for w in WORKERS:
        for i in range(w):
            parent, child = ctx.Pipe()
            procs.append(ctx.Process(target=_plain_worker, args=(base + [f"run.seed={10 * w + i}"], child)))
            procs[-1].start()
            pipes[w].append(parent)
    for conn in (c for conns in pipes.values() for c in conns):
        conn.recv()  # "ready": model loaded, env pool built
    rows = []
    for label, num_prompts in sizes.items():
        calls: dict[int, list[dict[str, float]]] = {w: [] for w in WORKERS}
        for r in range(rounds):
            for w in WORKERS if r % 2 == 0 else WORKERS[::-1]:
                start = time.perf_counter()
                for conn in pipes[w]:
                    conn.send(num_prompts // w)
                replies = [conn.recv() for conn in pipes[w]]
                wall, cpus, episodes = time.perf_counter() - start, [r[1] for r in replies], sum(r[2] for r in replies)
                calls[w].append({"time_s": wall, "episodes": episodes, "episodes_per_s": episodes / wall,
                                 "busy": sum(cpus) / (w * wall), "spread": 1 - min(cpus) / max(cpus),
                                 "actor_cpu_s_per_episode": sum(cpus) / episodes})
        for w in WORKERS:
            rows.append({"task": label, "workers": w, "calls": calls[w],
                         **{k: statistics.median(c[k] for c in calls[w]) for k in calls[w][0]}})
            print(rows[-1] | {"calls": len(calls[w])}, flush=True)
    for conn in (c for conns in pipes.values() for c in conns):
        conn.send(None)
    for proc in procs:
        proc.join()
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
    from opd_agents.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        tok = train_env_tokenizer(models / "tokenizer")
        for name in ("student", "math-teacher", "alfworld-teacher"):
            save_tiny_model(tok, models / name, name)
        out = Path(tmp) / "runs"
        # --quick: ALFWorld episodes of 3 turns instead of 20, fewer timed calls, no trainer run.
        base = overrides(models, out) + (["tasks.alfworld.max_turns=3"] if args.quick else [])
        rounds = {"math": 2, "alfworld": 1} if args.quick else {"math": 6, "alfworld": 2}
        result: dict[str, Any] = {"config": str(CONFIG.relative_to(CONFIG.parents[1])),
                                  "overrides": [o.replace(tmp, "<tmp>") for o in base]}
        result["throughput"] = throughput(base, rounds)
        prompts_per_step = load_config(CONFIG, base).rollout.prompts_per_step
        result["plain_processes"] = plain_processes(base, math_sizes(prompts_per_step), rounds["math"])
        result["rollout_split"] = rollout_split(base)
        if not args.quick:
            result["phases"] = phases(base, out)
    save("rollout_throughput" + ("_quick" if args.quick else ""), result)
    report(result)


def report(result: dict[str, Any]) -> None:
    base = {r["task"]: r for r in result["throughput"] if r["workers"] == 1}
    print_table("rollout throughput (median over interleaved calls; Ray, 1 CPU per worker)",
                ["task", "workers", "episodes/s", "tokens/s", "s per call", "× vs 1 worker", "actor CPU-s/episode",
                 "busy", "spread", "stolen CPU-s"],
                [[r["task"], r["workers"], r["episodes_per_s"], r["tokens_per_s"], r["time_s"],
                  r["episodes_per_s"] / base[r["task"]]["episodes_per_s"], r["actor_cpu_s_per_episode"],
                  f"{r['busy']:.0%}", f"{r['spread']:.0%}", r["steal_s"]] for r in result["throughput"]])
    plain = {r["task"]: r for r in result.get("plain_processes", []) if r["workers"] == 1}
    print_table("the same math requests in 1 vs 2 plain processes (no Ray; median over interleaved calls)",
                ["task", "processes", "episodes/s", "s per call", "× vs 1 process", "CPU-s/episode", "busy",
                 "spread"],
                [[r["task"], r["workers"], r["episodes_per_s"], r["time_s"],
                  r["episodes_per_s"] / plain[r["task"]]["episodes_per_s"], r["actor_cpu_s_per_episode"],
                  f"{r['busy']:.0%}", f"{r['spread']:.0%}"] for r in result.get("plain_processes", [])])
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
