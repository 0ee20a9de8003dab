"""Rollout throughput with 1 vs 2 Ray rollout workers, and where one training step's time goes.

Config: `configs/alternating.yaml` (the CPU default: math + ALFWorld alternating, 2 rollout workers, 8 envs per
worker, K = 32) with its `zoo:` models replaced by randomly initialised `build_tiny_model`s of the zoo recipe's sizes
(student 2 layers h128, math teacher 3 layers h128, ALFWorld teacher 4 layers h192) on a tokenizer trained on a
little env text: the zoo is not built here. Random models never emit the end-of-turn token and never win, so every
response has `max_new_tokens` tokens and every ALFWorld episode lasts its 20 turns (the longest case).
  throughput  `RolloutGroup`s (Ray actors, 1 CPU and 1 torch thread each) of 1 and of 2 workers, and for math also
              `PlainGroup`s of 1 and 2 plain processes running the same worker code in-process (no Ray: this
              host's own ceiling for the work), all alive at once, their calls interleaved (A, B, C, D, D, C, ...)
              so that the VM's drifting speed hits every side alike. Each call is one step's request
              (prompts_per_step x group_size episodes), after a warm-up call that builds the env pools; math also
              runs calls of MATH_SCALE x the step's prompts, to tell per-call fixed costs from per-episode work.
              Per row, medians over its calls: episodes/s and response tokens/s, and from the workers' own CPU
              clocks the CPU seconds per episode, `busy` (worker CPU / (workers x call time)) and `spread`
              (1 - min/max of the workers' CPU seconds in a call), and the CPU seconds the hypervisor stole
              during the call. ALFWorld runs with the config's env kwargs (`expert: null`) and with the
              env's own default, `expert="planner"` (fast-downward replans every step).
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
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import main as cli
from _common import print_table, save, save_tiny_model, train_env_tokenizer

if TYPE_CHECKING:
    from opd_agents.config import TaskConfig
    from opd_agents.rollout.group import RolloutGroup

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "alternating.yaml"
STEPS = 6
MATH_SCALE = 8  # the extra math row's request: 8 x prompts_per_step prompts per call
WORKERS = (1, 2)


def overrides(models: Path, out: Path) -> list[str]:
    """The default config on the benchmark's models; cheap evaluation (not measured) on the train split."""
    return [f"student.path={models / 'student'}", f"teachers.math_teacher.model={models / 'math-teacher'}",
            f"teachers.alfworld_teacher.model={models / 'alfworld-teacher'}", f"run.output_dir={out}",
            "run.name=phases", f"run.steps={STEPS}", "run.eval_before=false", "run.save_every=0",
            "eval.teacher_reference=false", "tasks.math.eval_episodes=1", "tasks.alfworld.eval_episodes=1",
            "tasks.alfworld.eval_env_kwargs={split: train}", "logging.progress=false", "logging.tensorboard=false"]


def throughput(base: list[str], rounds: dict[str, int]) -> list[dict[str, Any]]:
    """Every (runner, workers) side of every task, calls interleaved; one row per side and request size."""
    import ray

    from opd_agents.config import load_config
    from opd_agents.rollout.group import RolloutGroup
    from opd_agents.run.cluster import init_ray

    rows = []
    plain: dict[int, PlainGroup] = {}  # math only; alive next to the Ray groups, called in turn
    try:
        plain |= {w: PlainGroup(base, w) for w in WORKERS}
        for expert in (None, "planner"):
            extra = [] if expert is None else [f"tasks.alfworld.env_kwargs.expert={expert}"]
            # 3 logical CPUs: both Ray groups live at once, but only one side works at a time, so at most 2 busy
            # workers share the 2 cores.
            cfgs = {w: load_config(CONFIG, base + [f"rollout.num_workers={w}", f"ray.num_cpus={sum(WORKERS)}"]
                                   + extra) for w in WORKERS}
            init_ray(cfgs[1].ray)
            groups = {w: RolloutGroup.from_config(cfg) for w, cfg in cfgs.items()}
            for task in cfgs[1].tasks:
                if task.name == "math" and expert is not None:
                    continue  # the expert is an ALFWorld setting
                for group in groups.values():
                    group.rollout(task, num_prompts=1)  # warm-up: env pools, first games, grading workers
                sides: dict[tuple[str, int], Callable[[int], dict[str, float]]] = {
                    ("ray", w): partial(timed_call, group, task) for w, group in groups.items()}
                prompts = cfgs[1].rollout.prompts_per_step
                if task.name == "math":
                    sides |= {("plain", w): group.call for w, group in plain.items()}
                    sizes = {"math": prompts, f"math ({MATH_SCALE}x prompts per call)": MATH_SCALE * prompts}
                else:
                    sizes = {task.name + (f" (expert={expert})" if expert else ""): prompts}
                for label, num_prompts in sizes.items():
                    for (runner, w), calls in interleaved(sides, num_prompts, rounds[task.name]).items():
                        rows.append({"task": label, "runner": runner, "workers": w, "calls": calls,
                                     **{k: statistics.median(c[k] for c in calls) for k in calls[0]}})
                        print({k: v for k, v in rows[-1].items() if k != "calls"}, flush=True)
            for group in groups.values():
                group.shutdown()
    finally:
        for group in plain.values():
            group.close()
        ray.shutdown()  # the trainer run below starts its own cluster
    return rows


def interleaved(sides: dict[Any, Callable[[int], dict[str, float]]], num_prompts: int,
                rounds: int) -> dict[Any, list[dict[str, float]]]:
    """`rounds` calls of every side, in order A, B, C, C, B, A, A, ...: this VM's speed drifts by up to 1.7x between
    calls, and timing all of one side's calls before the next side's measured that drift, not the sides."""
    order = list(sides)
    calls: dict[Any, list[dict[str, float]]] = {key: [] for key in order}
    for r in range(rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            calls[key].append(sides[key](num_prompts))
    return calls


def timed_call(group: RolloutGroup, task: TaskConfig, num_prompts: int) -> dict[str, float]:
    """One rollout call: the group's `rollout/*` metrics (prefix dropped) and, from the actors' own clocks (all their
    threads, Ray's in-actor work included): CPU seconds per episode; `busy` = actor CPU / (workers x the call's
    `time_s`, as `PlainGroup.call` divides by its call; the two clock reads bracket the call, and the actors are
    idle outside it but for answering them); `spread` = 1 - min/max of the actors' CPU seconds (the share of the
    call the less loaded worker sat idle); and `steal_s`, the CPU seconds the hypervisor took from this VM
    meanwhile."""
    import ray

    def actor_cpu() -> list[float]:
        return ray.get([w.__ray_call__.remote(lambda _: time.process_time()) for w in group.workers])

    steal, before = stolen_s(), actor_cpu()
    metrics = {k.split("/", 1)[1]: v for k, v in group.rollout(task, num_prompts=num_prompts).metrics.items()}
    cpus = [after - b for after, b in zip(actor_cpu(), before)]
    return metrics | cpu_stats(cpus, metrics["time_s"], metrics["episodes"]) | {"steal_s": stolen_s() - steal}


def cpu_stats(cpus: list[float], seconds: float, episodes: float) -> dict[str, float]:
    """The workers' CPU seconds in one call of `seconds` → busy, spread and CPU seconds per episode (one definition
    for the Ray and the plain-process rows)."""
    return {"busy": sum(cpus) / (len(cpus) * seconds), "spread": 1 - min(cpus) / max(cpus),
            "actor_cpu_s_per_episode": sum(cpus) / episodes}


def stolen_s() -> float:
    """CPU seconds the hypervisor gave to others (all CPUs; the `steal` column of /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _plain_worker(overrides_: list[str], conn: Connection) -> None:
    """A `LocalRolloutGroup` (the Ray actor's worker code, in-process, 1 torch thread) in a plain process: runs each
    math request size received on `conn` and replies (CPU s, episodes, response tokens); None ends it."""
    from opd_agents.config import load_config
    from opd_agents.rollout.group import LocalRolloutGroup

    cfg = load_config(CONFIG, overrides_)
    group = LocalRolloutGroup.from_config(cfg)
    task = cfg.task("math")
    group.rollout(task, num_prompts=1)  # warm-up, as the Ray groups
    conn.send("ready")
    while (num_prompts := conn.recv()) is not None:
        cpu = time.process_time()
        episodes = group.rollout(task, num_prompts=num_prompts).episodes
        conn.send((time.process_time() - cpu, len(episodes), sum(e.response_tokens for e in episodes)))
    group.shutdown()


class PlainGroup:
    """The math work of a `workers`-actor Ray group without Ray: `workers` plain processes, each running its share
    of a request through the worker code in-process, driven over pipes. What this host gives generation-bound
    workers with no scheduler in between: the ceiling the Ray rows are read against."""

    def __init__(self, base: list[str], workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the parent runs torch threads (and Ray's, later)
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            self.procs.append(ctx.Process(target=_plain_worker, args=(base + [f"run.seed={10 * workers + i}"], child),
                                          daemon=True))
            self.procs[-1].start()
            child.close()  # the child's end lives in the child only: a dead child makes recv() raise, not hang
            self.conns.append(parent)
        for conn in self.conns:
            if (reply := conn.recv()) != "ready":
                raise RuntimeError(f"plain rollout process did not start: {reply!r}")

    def call(self, num_prompts: int) -> dict[str, float]:
        """One request of `num_prompts` prompts split evenly over the processes; the same keys as `timed_call`."""
        share, rest = divmod(num_prompts, len(self.conns))
        if rest:
            raise ValueError(f"{num_prompts} prompts do not split evenly over {len(self.conns)} processes")
        start, steal = time.perf_counter(), stolen_s()
        for conn in self.conns:
            conn.send(share)
        replies = [conn.recv() for conn in self.conns]
        wall = time.perf_counter() - start
        cpus, episodes, tokens = ([reply[i] for reply in replies] for i in range(3))
        return {"time_s": wall, "episodes": sum(episodes), "episodes_per_s": sum(episodes) / wall,
                "tokens_per_s": sum(tokens) / wall, **cpu_stats(cpus, wall, sum(episodes)),
                "steal_s": stolen_s() - steal}

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(None)
            except OSError:
                pass  # the child is gone already
            conn.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


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
        rounds = {"math": 2, "alfworld": 1} if args.quick else {"math": 6, "alfworld": 3}
        result: dict[str, Any] = {"config": str(CONFIG.relative_to(CONFIG.parents[1])),
                                  "overrides": [o.replace(tmp, "<tmp>") for o in base]}
        result["throughput"] = throughput(base, rounds)
        result["rollout_split"] = rollout_split(base)
        if not args.quick:
            result["phases"] = phases(base, out)
    save("rollout_throughput" + ("_quick" if args.quick else ""), result)
    report(result)


def report(result: dict[str, Any]) -> None:
    base = {(r["task"], r["runner"]): r for r in result["throughput"] if r["workers"] == 1}
    print_table("rollout throughput: Ray workers (1 CPU each) and plain processes (math); "
                "median over interleaved calls",
                ["task", "runner", "workers", "episodes/s", "tokens/s", "s per call", "× vs 1 worker", "CPU-s/episode",
                 "busy", "spread", "stolen CPU-s"],
                [[r["task"], r["runner"], r["workers"], r["episodes_per_s"], r["tokens_per_s"], r["time_s"],
                  r["episodes_per_s"] / base[r["task"], r["runner"]]["episodes_per_s"], r["actor_cpu_s_per_episode"],
                  f"{r['busy']:.0%}", f"{r['spread']:.0%}", r["steal_s"]] for r in result["throughput"]])
    for r in result["rollout_split"]:
        print_table(f"{r['task']}: one step's rollout in-process ({r['total_s']:.1f} s)", ["part", "s", "share"],
                    [[k, v, f"{v / r['total_s']:.0%}"] for k, v in r["parts_s"].items()])
    share_table(result.get("phases", []))


def share_table(steps: list[dict[str, Any]]) -> None:
    keys = ("time/rollout", "time/teacher", "time/learner", "time/sync")
    for task in sorted({s["task"] for s in steps}):
        rows = [s for s in steps if s["task"] == task]
        median = {k: statistics.median(s[k] for s in rows) for k in (*keys, "time/step")}
        step = median["time/step"]
        print_table(f"{task}: one training step (trainer's time/* metrics, median of {len(rows)} steps, "
                    f"{step:.1f} s per step)", ["phase", "s", "share"],
                    [[k.split("/")[1], median[k], f"{median[k] / step:.0%}"] for k in keys]
                    + [["other (logging, metrics)", step - sum(median(k) for k in keys), ""]])


if __name__ == "__main__":
    cli(__doc__, benchmark)
