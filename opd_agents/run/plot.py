"""Plots of a run's curves (runs/<name>/plots/*.png); the entry point is `python -m opd_agents.plot runs/<name>`.

One figure per metric family: eval success per task, train loss, grad norm, teacher–student gap, entropy,
clip fraction, rollout success, KL and gap by agent turn, the signal-fidelity probe. A curve whose standard error
is logged (`<key>_se`: the support path's subsample estimates) gets a ±2 SE band. Reads metrics.jsonl only, so it
works on a finished, running or killed run.
"""
from __future__ import annotations

from pathlib import Path

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


def plot_run(run_root: Path) -> list[Path]:
    records = read_metrics(Path(run_root) / "metrics.jsonl")
    out_dir = Path(run_root) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    for name, wanted in FIGURES.items():
        series = [k for k in keys if wanted(k)]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in series:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            (line,) = ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=key)
            band = [(r["step"], r[key], r[f"{key}_se"]) for r in records
                    if isinstance(r.get(key), (int, float)) and isinstance(r.get(f"{key}_se"), (int, float))]
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
