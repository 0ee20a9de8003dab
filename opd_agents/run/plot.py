"""Plots of a run (runs/<name>/plots/*.png) and its report; the entry point is `python -m opd_agents.plot runs/<name>`.

- `eval_success.png`: each task's eval success over steps, ± one binomial standard error as a band, and the task's
  teacher (played as a policy, `eval.teacher_reference`) as a dashed line at its level.
- `kl_by_turn.png` / `gap_by_turn.png`: per-turn KL and teacher−student gap as one heatmap per multi-turn task
  (turn × step), instead of one line per turn.
- line figures for the other metric families: train loss, grad norm, teacher–student gap, entropy, clip fraction,
  rollout success, the signal-fidelity probe; a curve whose standard error is logged (`<key>_se`: the support path's
  subsample estimates) gets a ±2 SE band.
`report.py` gathers them into one self-contained report.html (`report.render_run`: the figures, then the report).
Reads metrics.jsonl and eval/teacher.json only (through `envs.user_files`), so it works on a finished, running or
killed run, and on a damaged one: what cannot be plotted is left out.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from envs.user_files import MIB, UserFileError, load_json  # noqa: E402
from opd_agents.run.metrics import read_metrics  # noqa: E402

Points = list[tuple[int, dict[str, Any]]]  # (step, metrics record), in file order

LINE_FIGURES: dict[str, Callable[[str], bool]] = {
    "train_loss": lambda k: k.endswith("train/loss"),
    "grad_norm": lambda k: k == "train/grad_norm",
    "teacher_student_gap": lambda k: k == "train/gap_mean",
    "entropy": lambda k: k == "train/entropy",
    "clip_fraction": lambda k: k == "train/clip_fraction",
    "rollout_success": lambda k: k.endswith("/rollout/success_rate"),
    "signal_fidelity": lambda k: k in ("fidelity/cosine", "fidelity/rel_norm", "fidelity/zero_grad_frac",
                                       "fidelity/clip_fraction"),
}
# heatmap figure -> (metric before "@turn", colour-bar label)
TURN_HEATMAPS = {"kl_by_turn": ("kl_mean", "reverse KL (nats per token)"),
                 "gap_by_turn": ("gap_mean", "log p_T - log p_S of the sampled token")}
_TURN = re.compile(r"^(?:(?P<task>[^/]+)/)?train/(?P<metric>[a-z_]+)@turn(?P<turn>\d+)(?P<plus>\+?)$")
MAX_LABEL_CHARS = 80
TEACHER_FILE_MAX_BYTES = 16 * MIB


def _number(value: Any) -> float | None:
    """A plottable value: a finite int or float (not a bool, not an integer past float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _step(record: dict[str, Any]) -> int | None:
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**53 else None


def _label(key: str) -> str:
    """A legend label shown as written: `$` escaped (matplotlib would parse `$...$` as math), long keys cut."""
    short = key if len(key) <= MAX_LABEL_CHARS else key[:MAX_LABEL_CHARS] + "..."
    return short.replace("$", r"\$")


def _curve(points: Points, key: str) -> list[tuple[int, float]]:
    return [(step, v) for step, r in points if (v := _number(r.get(key))) is not None]


def read_points(run_root: Path) -> Points:
    """The run's metrics records that carry a valid step."""
    return [(step, r) for r in read_metrics(Path(run_root) / "metrics.jsonl") if (step := _step(r)) is not None]


def stored_object(path: Path, max_bytes: int, what: str) -> dict[str, Any]:
    """A JSON object the run wrote, or {} when it is absent, unreadable or not an object (a plot or report shows
    what it can)."""
    if not path.is_file():
        return {}
    try:
        data = load_json(path, max_bytes, what)
    except UserFileError:
        return {}
    return data if isinstance(data, dict) else {}


def teacher_levels(run_root: Path) -> dict[str, float]:
    """Task -> the teacher's eval success played as a policy (eval/teacher.json), {} without a readable one."""
    data = stored_object(Path(run_root) / "eval" / "teacher.json", TEACHER_FILE_MAX_BYTES, "teacher evaluation")
    return {task: v for task, res in data.items()
            if isinstance(res, dict) and (v := _number(res.get("success"))) is not None}


def eval_figure(points: Points, teacher: dict[str, float]) -> Figure | None:
    """Eval success per task over steps with a ± 1 SE band (binomial, from `eval/<task>/episodes`) and the teacher's
    level as a dashed line; None when no eval was logged."""
    tasks = sorted({m.group(1) for _, r in points for k in r if (m := re.fullmatch(r"eval/([^/]+)/success", k))})
    if not tasks:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in tasks:
        curve = _curve(points, f"eval/{task}/success")
        steps, values = zip(*curve)
        (line,) = ax.plot(steps, [100 * v for v in values], marker="o", label=f"{_label(task)} (student)")
        sized = [(s, v, n) for s, r in points if (v := _number(r.get(f"eval/{task}/success"))) is not None
                 and (n := _number(r.get(f"eval/{task}/episodes"))) is not None and n > 0]
        if sized:
            s_, v_, n_ = zip(*sized)
            se = [100 * math.sqrt(v * (1 - v) / n) for v, n in zip(v_, n_)]
            ax.fill_between(s_, [100 * v - e for v, e in zip(v_, se)], [100 * v + e for v, e in zip(v_, se)],
                            color=line.get_color(), alpha=0.2, label=f"{_label(task)} ± 1 SE")
        if task in teacher:
            ax.axhline(100 * teacher[task], color=line.get_color(), linestyle="--",
                       label=f"{_label(task)} teacher")
    ax.set_xlabel("training step")
    ax.set_ylabel("eval success (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("eval success per task" + (" (dashed: the task's teacher as a policy)" if set(tasks) & set(teacher)
                                            else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def turn_heatmap_figure(points: Points, metric: str, colour_label: str) -> Figure | None:
    """One heatmap per task with at least two turns of `<task>/train/<metric>@turn<k>` (rows: turns, the last one
    `k+` pooling the turns past it; columns: the steps that logged the task); None when no task has two turns."""
    grids: dict[str, dict[tuple[int, str], float]] = {}
    for step, record in points:
        for key, value in record.items():
            m = _TURN.match(key)
            if m and m["metric"] == metric and m["task"] and (v := _number(value)) is not None:
                grids.setdefault(m["task"], {})[(step, m["turn"] + m["plus"])] = v
    grids = {task: g for task, g in grids.items() if len({turn for _, turn in g}) >= 2}
    if not grids:
        return None
    fig, axes = plt.subplots(len(grids), 1, figsize=(8, 3.2 * len(grids)), squeeze=False)
    for ax, (task, grid) in zip(axes[:, 0], sorted(grids.items())):
        steps = sorted({s for s, _ in grid})
        turns = sorted({t for _, t in grid}, key=lambda t: (int(t.rstrip("+")), t.endswith("+")))
        cells = [[grid.get((s, t), math.nan) for s in steps] for t in turns]
        # One column per step that trained the task (alternating runs skip the other task's steps).
        image = ax.imshow(cells, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ticks = sorted({round(i * (len(steps) - 1) / 9) for i in range(10)}) if len(steps) > 10 else range(len(steps))
        ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
        ax.set_yticks(range(len(turns)), [f"turn {t}" for t in turns], fontsize=7)
        ax.set_xlabel(f"training step ({task}'s steps)")
        ax.set_ylabel("agent turn")
        ax.set_title(f"{_label(task)}: {metric} by turn (blank: no episode reached that turn)")
        fig.colorbar(image, ax=ax, label=colour_label)
    fig.tight_layout()
    return fig


def line_figure(points: Points, name: str, series: list[str]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in series:
        curve = _curve(points, key)
        (line,) = ax.plot(*zip(*curve), marker="o" if len(curve) < 20 else None, label=_label(key))
        band = [(step, v, e) for step, r in points
                if (v := _number(r.get(key))) is not None and (e := _number(r.get(f"{key}_se"))) is not None]
        if band:
            steps, values, se = zip(*band)
            ax.fill_between(steps, [v - 2 * e for v, e in zip(values, se)],
                            [v + 2 * e for v, e in zip(values, se)], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(name.replace("_", " "))
    ax.set_title(name.replace("_", " "))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_figures(run_root: Path) -> dict[str, Figure]:
    """Figure name -> figure, for every family the run's metrics hold (the caller closes them)."""
    points = read_points(run_root)
    figures: dict[str, Figure | None] = {"eval_success": eval_figure(points, teacher_levels(run_root))}
    figures |= {name: turn_heatmap_figure(points, metric, label) for name, (metric, label) in TURN_HEATMAPS.items()}
    keys = sorted({k for _, r in points for k, v in r.items() if k != "step" and _number(v) is not None})
    for name, wanted in LINE_FIGURES.items():
        series = [k for k in keys if wanted(k)]
        figures[name] = line_figure(points, name, series) if series else None
    return {name: fig for name, fig in figures.items() if fig is not None}


def plot_run(run_root: Path) -> list[Path]:
    """Draw the run's figures into run_root/plots/; the paths written (`report.render_run` adds the report). Records
    without a step (a non-negative integer), and values that are not finite numbers (strings, NaN, integers past
    float range), are left out; metric keys are shown as written."""
    out_dir = Path(run_root) / "plots"
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; move it away to plot the run")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in run_figures(run_root).items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
