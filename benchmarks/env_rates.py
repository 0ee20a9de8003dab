"""Environment rates: ALFWorld resets and steps per second, math grading and math env steps per second.

ALFWorld: `gymnasium.make("opd/ALFWorld-v0", ...)` with the default config's env kwargs (configs/alternating.yaml:
20 max steps, the compact prompt adapter with the agent's memory), on the built-in generated train games (built into
$OPD_AGENTS_CACHE on first use),
with the env's own default `expert="planner"` (fast-downward replans every step to fill info["expert_action"]) and
with `expert=None` (what the shipped configs set: OPD never reads the expert's action).
  reset (new game)   reset(seed=i): a random train game each time, so most resets load a new game
  reset (same game)  reset(options={"game": 0}) again and again: the engine keeps the loaded game
  step               a random admissible command each step (resets in between are not timed)
Math: `envs.math.grade(response, answer)` on a mix of correct, wrong, unanswered and LaTeX-equivalent answers (the
grading worker process is started before timing), and `opd/Math-v0` reset + step with those responses.
One process, one thread of Python; rates are events / wall second (CPU seconds of this process alongside: the
grading itself runs in a worker process, so its CPU time is not in that column).
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from typing import Any

import gymnasium
from _common import ROOT, main, print_table, save, timed

import envs  # noqa: F401  (registers the opd/ environments)
from envs.math.grading import grade
from opd_agents.config import load_config

# The main job's training env kwargs, without its `expert` (both settings are measured).
ALFWORLD_KWARGS = {key: value for key, value in
                   load_config(ROOT / "configs" / "alternating.yaml").task("alfworld").env_kwargs.items()
                   if key != "expert"}
# (response, reference): correct, wrong, no answer, and equivalent forms the grader must recognise.
GRADING_MIX = [
    ("12 + 35 = 47. The answer is \\boxed{47}.", "47"),
    ("So the result is \\boxed{48}.", "47"),
    ("I think it is forty-seven.", "47"),
    ("x = \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{50\\%}", "\\frac{1}{2}"),
    ("The set is \\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}"),
]


def rate(label: str, n: int, body: Callable[[int], None]) -> dict[str, Any]:
    with timed() as t:
        for i in range(n):
            body(i)
    return {"what": label, "n": n, **t, "per_s": n / t["time_s"], "per_cpu_s": n / t["cpu_s"]}


def alfworld_rates(expert: str | None, n_resets: int, n_steps: int) -> list[dict[str, Any]]:
    env = gymnasium.make("opd/ALFWorld-v0", expert=expert, **ALFWORLD_KWARGS)
    rng = random.Random(0)
    env.reset(seed=0)  # imports textworld and loads a first game outside the timing
    label = f"ALFWorld, expert={expert}"
    rows = [rate(f"{label}: reset (new game)", n_resets, lambda i: env.reset(seed=1 + i)),
            rate(f"{label}: reset (same game)", n_resets, lambda i: env.reset(options={"game": 0}))]
    _, info = env.reset(seed=0)
    wall = cpu = 0.0
    for i in range(n_steps):
        with timed() as t:
            _, _, terminated, truncated, info = env.step(rng.choice(info["admissible_commands"]))
        wall, cpu = wall + t["time_s"], cpu + t["cpu_s"]
        if terminated or truncated:
            _, info = env.reset(seed=n_resets + i)
    env.close()
    rows.append({"what": f"{label}: step (random admissible command)", "n": n_steps, "time_s": wall, "cpu_s": cpu,
                 "per_s": n_steps / wall, "per_cpu_s": n_steps / cpu})
    return rows


def math_rates(n: int) -> list[dict[str, Any]]:
    grade(*GRADING_MIX[0])  # start the grading worker outside the timing
    rows = [rate("math: grade(response, answer)", n, lambda i: grade(*GRADING_MIX[i % len(GRADING_MIX)]))]
    env = gymnasium.make("opd/Math-v0", split="train", levels=[0], num_problems=4000, system_prompt="")

    def episode(i: int) -> None:
        env.reset(seed=i)
        env.step(GRADING_MIX[i % len(GRADING_MIX)][0])

    rows.append(rate("math env: reset + step", n, episode))
    env.close()
    for row in rows:
        row["per_cpu_s"] = None  # the comparison runs in the grading worker process, outside this process's CPU time
    return rows


def benchmark(args: argparse.Namespace) -> None:
    n_resets, n_steps, n_grades = (10, 50, 60) if args.quick else (40, 400, 600)
    rows = [row for expert in ("planner", None) for row in alfworld_rates(expert, n_resets, n_steps)]
    rows += math_rates(n_grades)
    save("env_rates" + ("_quick" if args.quick else ""), {"alfworld_kwargs": ALFWORLD_KWARGS, "rows": rows})
    print_table("environment rates (one process)", ["what", "n", "per second", "per CPU-second"],
                [[r["what"], r["n"], r["per_s"], r["per_cpu_s"] or "-"] for r in rows])


if __name__ == "__main__":
    main(__doc__, benchmark)
