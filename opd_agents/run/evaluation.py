"""Per-task evaluation: success rate (pass@1, avg@k) on each task's eval split, broken down by task type, level
and subject.

`Evaluator.run(group, step)` plays `task.eval_episodes` eval items × k samples per task with the policy held by
`group` (the whole split, or below its size a seeded sample stratified like it, the same items for every policy:
`run/eval_items.py`; their ids are written under `item_ids`) and returns flat metrics (`eval/<task>/success`,
`eval/<task>/avg@k`, `eval/<task>/type/<t>`, and where the episodes' final info carries them, e.g. math on
MATH-500, `eval/<task>/level_<L>/success` and `eval/<task>/subject_<s>/success` with their item counts
`.../episodes`; where episodes report `translated_actions`, `eval/<task>/translated_action_rate` per action).
Results go to `eval/step_<N>.json`;
`write_summary` writes `eval.json` (before / final / teacher rows, and a `verdict` per task) and prints a table and
the verdict: before -> after with the standard errors, the gain's paired standard error over the same eval items
(per-item outcomes are kept in `eval/step_<N>.json` under `items`), and whether the gain exceeds twice it.
Columns name what was evaluated: `student (before)` is the config's untrained student, `student (after)` the
trained one, a named checkpoint its own name (`Evaluator.names`).
The teacher reference plays each task's teacher model as a policy through the same rollout code.
"""
from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, FiniteFloat
from rich.console import Console
from rich.table import Table

from envs.user_files import MIB, load_json, validate
from opd_agents.config import Config, ModelConfig, TaskConfig
from opd_agents.run.eval_items import eval_item_ids
from opd_agents.run.rundir import RunDir, atomic_write_json

EVAL_MAX_BYTES = 64 * MIB
PROGRESS_LINE_S = 30.0  # an evaluation's progress lines come at most this often


class StoredEval(BaseModel):
    """`eval/step_<N>.json`: per task, the summary metrics and the per-item outcomes (0 / 1)."""

    model_config = ConfigDict(extra="allow")
    student: dict[str, dict[str, FiniteFloat]]
    items: dict[str, list[Literal[0, 1]]] = {}
    item_ids: dict[str, list[int] | None] = {}


# Episode info fields that split pass@1 into groups: ALFWorld's task type, math's difficulty level and subject.
BREAKDOWN_FIELDS = ("task_type", "level", "subject")
_NOT_KEY_SAFE = re.compile(r"[^a-z0-9]+")


def key_safe(value: object) -> str:
    """`value` as a metric-key part: lowercase, every run of other characters one `_` ("Counting & Probability"
    -> "counting_probability"); names that differ only there share a key."""
    return _NOT_KEY_SAFE.sub("_", str(value).strip().lower()).strip("_")


def episode_rows(episodes: Iterable[Any], k: int) -> list[dict[str, Any]]:
    """What `summarize` reads from eval episodes laid out item-major (k samples per item): index, sample,
    success, the `BREAKDOWN_FIELDS` the episode's final info carries, and where it counts `translated_actions`,
    that count and the episode's turns."""
    rows = []
    for i, ep in enumerate(episodes):
        row = {"index": i // k, "sample": i % k, "success": ep.success}
        row |= {f: ep.info[f] for f in BREAKDOWN_FIELDS if ep.info.get(f) is not None}
        if ep.info.get("translated_actions") is not None:
            row |= {"translated_actions": ep.info["translated_actions"], "turns": ep.num_turns}
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], k: int) -> dict[str, float]:
    """pass@1 = success of sample 0 of each item; avg@k = mean success over all k samples; pass@1 per task type
    (`type/<t>`), and per level / subject (`level_<L>/success`, `subject_<s>/success`, item counts in
    `.../episodes`) over the items whose rows carry one."""
    first = [r for r in rows if r["sample"] == 0]
    out = {"success": sum(r["success"] for r in first) / max(1, len(first)), "episodes": float(len(first))}
    if k > 1:
        out[f"avg@{k}"] = sum(r["success"] for r in rows) / max(1, len(rows))
    translated = [r for r in first if "translated_actions" in r]
    if translated:
        out["translated_action_rate"] = sum(r["translated_actions"] for r in translated) / max(
            1, sum(r["turns"] for r in translated))
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in first:
        if r.get("task_type"):
            by_type[r["task_type"]].append(bool(r["success"]))
    out |= {f"type/{t}": sum(v) / len(v) for t, v in sorted(by_type.items())}
    for field in ("level", "subject"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in first:
            name = "" if r.get(field) is None else key_safe(r[field])
            if name:
                groups[f"{field}_{name}"].append(bool(r["success"]))
        for name, v in sorted(groups.items()):
            out[f"{name}/success"] = sum(v) / len(v)
            out[f"{name}/episodes"] = float(len(v))
    return out


def item_successes(rows: list[dict[str, Any]]) -> list[int]:
    """Sample 0's outcome (0 / 1) per eval item, in item order: what a paired before/after comparison reads."""
    return [int(bool(r["success"])) for r in sorted((r for r in rows if r["sample"] == 0), key=lambda r: r["index"])]


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def verdict(before: list[int], after: list[int]) -> dict[str, Any]:
    """Before -> after on the same eval items: each rate with its binomial standard error, the gain with its paired
    standard error (the items' after - before differences), and whether the gain exceeds twice that (~95%: the gain
    is larger than the noise of drawing this eval split). Fewer than 2 items, or different item counts: no test."""
    n = len(before)
    rate_before, rate_after = sum(before) / max(n, 1), sum(after) / max(len(after), 1)
    out: dict[str, Any] = {"items": n, "before": rate_before, "after": rate_after, "gain": rate_after - rate_before,
                           "before_se": _binomial_se(rate_before, n), "after_se": _binomial_se(rate_after, len(after))}
    if n < 2 or len(after) != n:
        return out | {"gain_se": None, "beyond_noise": None}
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    beyond = abs(mean) > 2 * se if se > 0 else mean != 0
    return out | {"gain_se": se, "beyond_noise": beyond}


def verdict_line(task: str, v: dict[str, Any]) -> str:
    """One plain sentence per task, e.g. `math: 26.0% (±2.2) -> 33.5% (±2.4) on 400 items: +7.5 points (paired
    SE 2.1): larger than the eval split's noise`."""
    head = (f"{task}: {100 * v['before']:.1f}% (±{100 * v['before_se']:.1f}) -> {100 * v['after']:.1f}% "
            f"(±{100 * v['after_se']:.1f}) on {v['items']} items: {100 * v['gain']:+.1f} points")
    if v["gain_se"] is None:
        return head + " (too few items for a test)"
    if not v["beyond_noise"]:
        return head + f" (paired SE {100 * v['gain_se']:.1f}): within the eval split's noise (|gain| <= 2 SE)"
    word = "gain" if v["gain"] > 0 else "loss"
    return head + f" (paired SE {100 * v['gain_se']:.1f}): a {word} larger than the eval split's noise (> 2 SE)"


class ProgressLines:
    """`progress(done, successes)` for an evaluation: one line per `every_s` seconds at most while episodes finish,
    and one when the last finishes — a person watching a 25-minute evaluation sees it move."""

    def __init__(self, label: str, total: int, console: Console, every_s: float = PROGRESS_LINE_S) -> None:
        self.label, self.total, self.console, self.every_s = label, total, console, every_s
        self.start = self.last = time.monotonic()
        self.shown = -1

    def __call__(self, done: int, successes: int) -> None:
        done = min(done, self.total)  # a share re-run after a worker restart counts again
        now = time.monotonic()
        if done == self.shown or (done < self.total and now - self.last < self.every_s) or not done:
            return
        self.shown, self.last = done, now
        minutes, seconds = divmod(int(now - self.start), 60)
        self.console.print(f"[{self.label}] {done}/{self.total} episodes, success {successes / done:.1%} "
                           f"({minutes}m{seconds:02d}s)", highlight=False, markup=False)


class Evaluator:
    def __init__(self, cfg: Config, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.summary: dict[str, dict[str, dict[str, float]]] = {}
        self.items: dict[str, dict[str, list[int]]] = {}  # label -> task -> per-item outcome (item_successes)
        self.item_ids: dict[str, list[int] | None] = {}  # task -> the eval item ids every policy plays
        self.names = dict(_LABELS)  # label -> the column that names what was evaluated
        self.console = Console()
        self._last_items: dict[str, list[int]] = {}
        before = run_dir.eval_dir / "step_0.json"
        if before.exists() or before.is_symlink():  # a resumed run keeps the "before" row its first attempt measured
            what = "stored evaluation"
            stored = validate(StoredEval, load_json(before, EVAL_MAX_BYTES, what), before, what)
            self.summary["before"] = stored.student
            self.items["before"] = stored.items
            self.item_ids |= stored.item_ids

    def evaluate_policy(self, group: Any, tasks: list[TaskConfig] | None = None) -> dict[str, dict[str, float]]:
        """Task name -> summary, for whatever policy `group` holds (default: every task)."""
        e = self.cfg.eval
        results, self._last_items = {}, {}
        for task in self.cfg.tasks if tasks is None else tasks:
            if task.name not in self.item_ids:
                self.item_ids[task.name] = eval_item_ids(task, self.cfg.run.seed)
            items = self.item_ids[task.name]
            total = (task.eval_episodes if items is None else len(items)) * e.samples_per_prompt
            batch = group.evaluate_episodes(task, task.eval_episodes, greedy=e.greedy, k=e.samples_per_prompt,
                                            seed=self.cfg.run.seed, items=items,
                                            progress=ProgressLines(f"eval {task.name}", total, self.console))
            rows = episode_rows(batch.episodes, e.samples_per_prompt)
            results[task.name] = summarize(rows, e.samples_per_prompt)
            self._last_items[task.name] = item_successes(rows)
        return results

    def run(self, group: Any, *, step: int, label: str | None = None) -> dict[str, float]:
        """Evaluate the policy `group` holds; write eval/step_<N>.json; return flat metrics."""
        results = self.evaluate_policy(group)
        if label:
            self.summary[label] = results
            self.items[label] = self._last_items
        atomic_write_json(self.run_dir.eval_dir / f"step_{step}.json",
                          {"step": step, "student": results, "items": self._last_items,
                           "item_ids": {task: self.item_ids.get(task) for task in results}})
        return {f"eval/{task}/{key}": v for task, res in results.items() for key, v in res.items()}

    def run_teacher_reference(self) -> dict[str, float]:
        """Evaluate every task's teacher as a policy; write eval/teacher.json (task -> summary) and
        eval/teacher_items.json (its per-item outcomes and item ids, as `eval/step_<N>.json` has them, for paired
        comparisons on the same items); return flat metrics.

        Call it after the student's rollout workers are shut down: the teacher policies need Ray resources too,
        and on a small local cluster they would otherwise wait for ever for the student's CPUs."""
        results = self.teacher_reference()
        self.summary["teacher"] = results
        atomic_write_json(self.run_dir.eval_dir / "teacher.json", results)
        atomic_write_json(self.run_dir.eval_dir / "teacher_items.json",
                          {"items": self.items.get("teacher", {}),
                           "item_ids": {task: self.item_ids.get(task) for task in results}})
        return {f"eval_teacher/{task}/{key}": v for task, res in results.items() for key, v in res.items()}

    def teacher_reference(self) -> dict[str, dict[str, float]]:
        """Each task's teacher model played as a policy on that task (hf-loadable teachers only)."""
        from opd_agents.rollout.group import RolloutGroup
        from opd_agents.run.cluster import init_ray

        out, items = {}, {}
        for task in self.cfg.tasks:
            teacher = self.cfg.teachers[task.teacher]
            policy = ModelConfig(path=teacher.model, dtype=teacher.dtype, chat_template=teacher.chat_template)
            init_ray(self.cfg.ray)
            group = RolloutGroup(policy, self.cfg.rollout, imports=self.cfg.run.imports, seed=self.cfg.run.seed)
            try:
                out |= self.evaluate_policy(group, [task])
                items |= self._last_items
            finally:
                group.shutdown()
        self.items["teacher"] = items
        return out

    def verdicts(self) -> dict[str, dict[str, Any]]:
        """Task -> :func:`verdict` of the student before vs after training (tasks with both measured)."""
        before, after = self.items.get("before", {}), self.items.get("final", {})
        return {task: verdict(before[task], after[task]) for task in before if task in after}

    def write_summary(self, console: Console | None = None) -> dict[str, Any]:
        console = console or Console()
        verdicts = self.verdicts()
        summary = self.summary | ({"verdict": verdicts} if verdicts else {})
        summary |= {"columns": {label: self.names.get(label, label) for label in self.summary},
                    "item_ids": dict(self.item_ids)}
        atomic_write_json(self.run_dir.root / "eval.json", summary)
        print_table(self.summary, console, self.names)
        for task, v in verdicts.items():
            console.print(verdict_line(task, v), highlight=False)
        return summary


_LABELS = {"before": "student (before)", "final": "student (after)", "teacher": "teacher"}


def print_table(summary: dict[str, dict[str, dict[str, float]]], console: Console,
                names: dict[str, str] | None = None) -> None:
    """Policies (before / after / teacher) as columns headed by `names` (default `student (before)`, `student
    (after)`, `teacher`), one row per metric: every task's success, then its avg@k and per-level / per-subject /
    per-type breakdown (`level_<L>`, `subject_<s>`, `<t>`); counts (`episodes`) are left to the JSON — a tall table
    stays readable at any terminal width."""
    names = _LABELS | (names or {})
    labels = [label for label in _LABELS if label in summary]
    metrics = sorted({(task, key) for res in summary.values() for task, r in res.items() for key in r
                      if key.rpartition("/")[2] != "episodes"}, key=lambda tk: (tk[0], tk[1] != "success", tk[1]))
    table = Table(title="success rate per task, % (eval split)")
    table.add_column("task / metric")
    for label in labels:
        table.add_column(names[label], justify="right")
    for task, key in metrics:
        values = [summary[label].get(task, {}).get(key) for label in labels]
        name = task if key == "success" else f"  {key.removeprefix('type/').removesuffix('/success')}"
        table.add_row(name, *["-" if v is None else f"{100 * v:.1f}" for v in values])
    console.print(table)
