"""Plots of a run's curves (runs/<name>/plots/*.png); the entry point is `python -m opd_agents.plot runs/<name>`.

One figure per metric family: eval success per task, train loss, grad norm, teacher–student gap, entropy,
clip fraction, rollout success, KL and gap by agent turn, the signal-fidelity probe. A curve whose standard error
is logged (`<key>_se`: the support path's subsample estimates) gets a ±2 SE band. Reads metrics.jsonl only (through
`envs.user_files`), so it works on a finished, running or killed run, and on a damaged one: what cannot be plotted
is left out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from opd_agents.run.metrics import read_metrics  # noqa: E402

FIGURES = {
    "eval_success": lambda k: k.startswith("eval/") and k.endswith("/success"),
    "train_loss": lambda k: k.endswith("train/loss"),
    "grad_norm": lambda k: k == "train/grad_norm",
    "teacher_student_gap": lambda k: k == "train/gap_mean",
    "entropy": lambda k: k == "train/entropy",
    "clip_fraction": lambda k: k == "train/clip_fraction",
    "rollout_success": lambda k: k.endswith("/rollout/success_rate"),
    "kl_by_turn": lambda k: k.startswith("train/kl_mean@turn"),
    "gap_by_turn": lambda k: k.startswith("train/gap_mean@turn"),
    "signal_fidelity": lambda k: k in ("fidelity/cosine", "fidelity/rel_norm", "fidelity/zero_grad_frac",
                                       "fidelity/clip_fraction"),
}


MAX_LABEL_CHARS = 80


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


def plot_run(run_root: Path) -> list[Path]:
    """Draw the figures of FIGURES from the run's metrics.jsonl into run_root/plots/. Records without a step (a
    non-negative integer), and values that are not finite numbers (strings, NaN, integers past float range), are left
    out; metric keys are shown as written."""
    points = [(step, r) for r in read_metrics(Path(run_root) / "metrics.jsonl") if (step := _step(r)) is not None]
    out_dir = Path(run_root) / "plots"
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; move it away to plot the run")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    keys = sorted({k for _, r in points for k, v in r.items() if k != "step" and _number(v) is not None})
    for name, wanted in FIGURES.items():
        series = [k for k in keys if wanted(k)]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in series:
            curve = [(step, v) for step, r in points if (v := _number(r.get(key))) is not None]
            (line,) = ax.plot(*zip(*curve), marker="o" if len(curve) < 20 else None, label=_label(key))
            band = [(step, v, e) for step, r in points
                    if (v := _number(r.get(key))) is not None and (e := _number(r.get(f"{key}_se"))) is not None]
            if band:
                steps, values, se = zip(*band)
                ax.fill_between(steps, [v - 2 * e for v, e in zip(values, se)],
                                [v + 2 * e for v, e in zip(values, se)], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
