"""Rendering of the comparison grid's results (`experiments.grid`): the paper-shaped markdown tables of the per-row
aggregates and the success / learning-curve plots. Pure functions of the aggregates; nothing here runs training."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _cell(stat: tuple[float, float] | list[float] | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if stat is None else f"{scale * stat[0]:.{digits}f} ± {scale * stat[1]:.{digits}f}"


def _short(note: str, limit: int = 160) -> str:
    note = " ".join(note.split()).replace("|", "/")
    return note if len(note) <= limit else note[: limit - 1] + "…"


def to_markdown(agg: dict[str, dict[str, Any]], header: dict[str, Any], groups: dict[str, str],
                diagnostics: dict[str, str]) -> str:
    """Paper-shaped tables: one success table per row group (`groups`: group → title) and one table of the
    training-stability `diagnostics` (column label → metric key) plus each task's rollout success."""
    metrics = sorted({k for a in agg.values() for k in a["success"]}, key=lambda k: (k.split("/")[0], "/type/" in k, k))
    tasks = sorted({k.split("/")[0] for k in metrics})
    lines = ["# OPD comparison grid", "",
             f"Config `{header['config']}`, seeds {header['seeds']}, overrides {header['set'] or 'none'}"
             f"{', special tokens ' + str(header['special_tokens']) if header['special_tokens'] else ''}. "
             "Success on each task's eval split in %, mean ± std over the seeds that finished (n = seeds done / "
             "selected); `type/…` = success per task type. Diagnostics: mean over the last 25% of training steps, "
             "then mean ± std over seeds (clip fraction only exists for sampled-token OPD; gap = teacher − student "
             "log-prob of the sampled token).", ""]
    for group, title in groups.items():
        names = [n for n, a in agg.items() if a["group"] == group]
        if not names:
            continue
        lines += [f"## {title}", "", "| row | n | " + " | ".join(m.replace("/", " ") for m in metrics) + " | notes |",
                  "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |"]
        for n in names:
            a = agg[n]
            cells = [_cell(a["success"].get(m), 100) for m in metrics]
            notes = "; ".join(_short(x) for x in a["notes"])
            lines.append(f"| {a['label']} (`{n}`) | {a['seeds_done']}/{a['seeds']} | {' | '.join(cells)} | {notes} |")
        lines.append("")
    diag_cols = list(diagnostics.items()) + [(f"{t} rollout success %", f"{t}/rollout/success_rate") for t in tasks]
    trained = [n for n, a in agg.items() if a["diagnostics"]]
    if trained:
        lines += ["## Training-stability diagnostics (last 25% of steps)", "",
                  "| row | " + " | ".join(c for c, _ in diag_cols) + " |",
                  "| --- | " + " | ".join("---" for _ in diag_cols) + " |"]
        for n in trained:
            d = agg[n]["diagnostics"]
            cells = [_cell(d.get(k), 100 if "success" in k else 1, 1 if "success" in k else 3) for _, k in diag_cols]
            lines.append(f"| {agg[n]['label']} (`{n}`) | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def plot(agg: dict[str, dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """`success.png` (eval success per row and task, std error bars) and `curves.png` (every curve, mean over seeds
    per step) under `out_dir`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = [n for n, a in agg.items() if a["success"]]
    overall = sorted({k for n in names for k in agg[n]["success"] if k.endswith("/success")})
    if names and overall:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) * len(overall)), 4.5))
        width = 0.8 / len(overall)
        for j, key in enumerate(overall):
            stats = [agg[n]["success"].get(key, (float("nan"), 0.0)) for n in names]
            ax.bar([i + j * width for i in range(len(names))], [100 * s[0] for s in stats], width,
                   yerr=[100 * s[1] for s in stats], capsize=3, label=key.split("/")[0])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
        ax.set_ylabel("eval success % (mean ± std over seeds)")
        ax.set_ylim(0, 105)
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "success.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    keys = sorted({k for seeds in runs.values() for r in seeds.values() for k in r.get("curves", {})})
    if keys:
        cols = min(3, len(keys))
        nrows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.5 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for name, seeds in runs.items():
                by_step: dict[int, list[float]] = {}
                for r in seeds.values():
                    for step, v in r.get("curves", {}).get(key, []):
                        by_step.setdefault(step, []).append(v)
                if by_step:
                    steps = sorted(by_step)
                    ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=name,
                            marker="o" if len(steps) < 10 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle("learning curves (mean over seeds)")
        fig.tight_layout()
        paths.append(out_dir / "curves.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
