"""Rendering of the comparison grid's results (`experiments.grid`): the paper-shaped markdown tables of the per-row
aggregates and the success / learning-curve plots. Pure functions of the aggregates; nothing here runs training."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _number(value: float, scale: float, digits: int) -> str:
    return f"{scale * value:.{digits}f}"


def stat_cell(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """A `mean_se` statistic as `mean ± SE (value / value / …)`, scaled; a single run as its value alone (no ±: its
    spread is unknown); `–` for none."""
    if stat is None:
        return "–"
    mean = _number(stat["mean"], scale, digits)
    if stat["se"] is None:
        return mean
    values = " / ".join(_number(v, scale, digits) for v in stat["values"])
    return f"{mean} ± {_number(stat['se'], scale, digits)} ({values})"


def paired_cell(test: dict[str, Any] | None) -> str:
    """A `paired_test` of success fractions as `Δ points ± SE, p (n pairs)`; `–` (no test) with fewer than 2 pairs;
    empty for a row without a test (the baseline, the reference rows)."""
    if test is None:
        return ""
    pairs = f"{test['n']} pair{'' if test['n'] == 1 else 's'}"
    if test["se"] is None:
        return f"– ({pairs})"
    diff = f"{100 * test['diff']:+.1f} ± {100 * test['se']:.1f}"
    if test["p"] is None:
        return f"{diff}, p – ({pairs}, all differences equal)"
    p = "p < 0.001" if test["p"] < 0.001 else f"p = {test['p']:.3f}"
    return f"{diff}, {p} ({pairs})"


def _short(note: str, limit: int = 160) -> str:
    note = " ".join(note.split()).replace("|", "/")
    return note if len(note) <= limit else note[: limit - 1] + "…"


def _wall_time(header: dict[str, Any]) -> str:
    """The header's wall time: this invocation's, and with `wall_seconds_total` the total over every invocation into
    the grid's folder (an invocation often reuses runs an earlier one finished, so its own time undercounts)."""
    wall, total = header.get("wall_seconds"), header.get("wall_seconds_total")
    this = "not recorded" if wall is None else f"{wall / 60:.1f} min"
    if total is None:
        return this
    return f"{this} this invocation, {total / 60:.1f} min over all invocations into this folder"


def _intro(header: dict[str, Any], pooled: bool) -> str:
    """What the tables hold and exactly what their ± and tests mean."""
    zoos = f"zoo build seeds {header['zoos']}" if pooled else f"zoo build seed {header['zoos'][0]}"
    tokens = f", special tokens {header['special_tokens']}" if header.get("special_tokens") else ""
    text = (f"Config `{header['config']}`, {zoos} (`run.zoo_seed`), seeds {header['seeds']}, overrides "
            f"{header.get('set') or 'none'}{tokens}; grid wall time {_wall_time(header)}. "
            + (f"Re-rendered: {header['rerendered']}. " if header.get("rerendered") else "")
            + (f"Merged from {len(header['merged_from'])} grids (`merged_from` in results.json: each one's folder, "
               "commit, zoos, seeds and wall time); no run repeated. " if header.get("merged_from") else "") +
            "Success on each task's eval split in %: mean ± SE over the runs that finished, where ± is one standard "
            "error of the mean (sample std over runs / √n; n = runs finished / runs selected), then each run's value "
            "in parentheses in seed order; a cell without ± comes from a single run (no SE). `type/…` = success per "
            "task type. Paired test vs sampled-token OPD (`sampled`), for each other training row and each task's "
            "overall success: Δ = mean over the pairs of (row − `sampled`) in points ± its SE, and the two-sided "
            "paired t-test p-value with n − 1 degrees of freedom over n pairs; a pair is the two rows' runs with the "
            "same seed on the same zoo (same initial student and seeded data, hence the same step-1 rollouts where "
            "the rollout settings match); – = fewer than 2 pairs, no test. Ablation and support rows are also "
            "paired, the same way, against `topk` (K=32, top-p 0.9, renormalised, teacher top-K), and each support "
            "row against the support rows above it. Each p is for its own comparison, uncorrected for the number of "
            "tests. "
            "Diagnostics: per run the mean over the last 25% of training steps, then mean ± SE over runs (failed runs "
            "included) with each run's value (clip fraction only exists for sampled-token OPD; gap = teacher − "
            "student log-prob of the sampled token).")
    if pooled:
        text += (" Pooled tables: each zoo's mean, then mean ± SE over all (zoo, seed) runs with each run's value "
                 "(zoo by zoo, seeds in order), and the paired test over (zoo, seed) pairs.")
    return text


def _metrics(agg: dict[str, dict[str, Any]]) -> list[str]:
    """Every success metric of `agg`, per task: the overall success first, then per type / level."""
    return sorted({k for a in agg.values() for k in a["success"]}, key=lambda k: (k.split("/")[0], "/type/" in k, k))


def _zoo_tables(agg: dict[str, dict[str, Any]], groups: dict[str, str], diagnostics: dict[str, str],
                level: str) -> list[str]:
    """One zoo's (or a single-zoo grid's) tables under `level` headings: success per row group, the paired tests
    vs `sampled`, and the training-stability diagnostics with each task's rollout success."""
    metrics = _metrics(agg)
    tasks = sorted({k.split("/")[0] for k in metrics})
    lines: list[str] = []
    for group, title in groups.items():
        names = [n for n, a in agg.items() if a["group"] == group]
        if not names:
            continue
        lines += [f"{level} {title}", "",
                  "| row | n | " + " | ".join(m.replace("/", " ") for m in metrics) + " | notes |",
                  "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |"]
        for n in names:
            a = agg[n]
            cells = [stat_cell(a["success"].get(m), 100) for m in metrics]
            notes = "; ".join(_short(x) for x in a["notes"])
            lines.append(f"| {a['label']} (`{n}`) | {a['seeds_done']}/{a['seeds']} | {' | '.join(cells)} | {notes} |")
        lines.append("")
    tested = [n for n, a in agg.items() if a["vs_sampled"]]
    overall = sorted({m for n in tested for m in agg[n]["vs_sampled"]})
    if tested:
        lines += [f"{level} Paired difference vs sampled-token OPD (`sampled`)", "",
                  "| row | " + " | ".join(f"{m.split('/')[0]}: Δ points ± SE, p (n pairs)" for m in overall) + " |",
                  "| --- | " + " | ".join("---" for _ in overall) + " |"]
        for n in tested:
            cells = [paired_cell(agg[n]["vs_sampled"].get(m)) or "–" for m in overall]
            lines.append(f"| {agg[n]['label']} (`{n}`) | {' | '.join(cells)} |")
        lines.append("")
    lines += _within_table(agg, f"{level} Paired differences among the ablation and support rows")
    diag_cols = list(diagnostics.items()) + [(f"{t} rollout success %", f"{t}/rollout/success_rate") for t in tasks]
    trained = [n for n, a in agg.items() if a["diagnostics"]]
    if trained:
        lines += [f"{level} Training-stability diagnostics (last 25% of steps)", "",
                  "| row | " + " | ".join(c for c, _ in diag_cols) + " |",
                  "| --- | " + " | ".join("---" for _ in diag_cols) + " |"]
        for n in trained:
            d = agg[n]["diagnostics"]
            cells = [stat_cell(d.get(k), 100 if "success" in k else 1, 1 if "success" in k else 3)
                     for _, k in diag_cols]
            lines.append(f"| {agg[n]['label']} (`{n}`) | {' | '.join(cells)} |")
        lines.append("")
    return lines


def _within_table(agg: dict[str, dict[str, Any]], title: str) -> list[str]:
    """The `vs_rows` tests (ablation / support rows against `topk`, supports against each other): one line per
    (row, other row), a column per task's overall success; nothing when there are none."""
    pairs = [(n, b) for n, a in agg.items() for b in a.get("vs_rows", {})]
    if not pairs:
        return []
    overall = sorted({m for n, b in pairs for m in agg[n]["vs_rows"][b]})
    lines = [title, "", "| row | vs | " + " | ".join(f"{m.split('/')[0]}: Δ points ± SE, p (n pairs)" for m in overall)
             + " |", "| --- | --- | " + " | ".join("---" for _ in overall) + " |"]
    for n, b in pairs:
        cells = [paired_cell(agg[n]["vs_rows"][b].get(m)) or "–" for m in overall]
        lines.append(f"| {agg[n]['label']} (`{n}`) | `{b}` | {' | '.join(cells)} |")
    return lines + [""]


def _pooled_tables(per_zoo: dict[int, dict[str, dict[str, Any]]], pooled: dict[str, dict[str, Any]]) -> list[str]:
    """Per task, overall success pooled over zoos: each zoo's mean, the pooled mean ± SE with every run's value, and
    the paired test vs `sampled` over (zoo, seed) pairs."""
    lines: list[str] = []
    for metric in [m for m in _metrics(pooled) if m.split("/")[1:] == ["success"]]:
        task = metric.split("/")[0]
        lines += [f"## Pooled over zoos {list(per_zoo)}: {task} success %", "",
                  "| row | n | " + " | ".join(f"zoo {z} mean" for z in per_zoo)
                  + " | pooled: mean ± SE (each run) | vs `sampled`: Δ points ± SE, p (n pairs) |",
                  "| --- | --- | " + " | ".join("---" for _ in per_zoo) + " | --- | --- |"]
        for n, a in pooled.items():
            means = [per_zoo[z][n]["success"].get(metric) for z in per_zoo]
            cells = ["–" if s is None else _number(s["mean"], 100, 1) for s in means]
            cells += [stat_cell(a["success"].get(metric), 100), paired_cell(a["vs_sampled"].get(metric))]
            lines.append(f"| {a['label']} (`{n}`) | {a['seeds_done']}/{a['seeds']} | {' | '.join(cells)} |")
        lines.append("")
    return lines + _within_table(pooled, f"## Pooled over zoos {list(per_zoo)}: paired differences among the "
                                 "ablation and support rows, over (zoo, seed) pairs")


def to_markdown(per_zoo: dict[int, dict[str, dict[str, Any]]], pooled: dict[str, dict[str, Any]],
                header: dict[str, Any], groups: dict[str, str], diagnostics: dict[str, str]) -> str:
    """The grid's report. `per_zoo`: zoo build seed → per-row aggregates of that zoo's runs; `pooled`: the same over
    every run; `groups`: row group → title; `diagnostics`: column label → metric key. One zoo: its tables (success
    per row group, paired tests, diagnostics). Several: those tables per zoo, then per task a pooled table."""
    several = len(per_zoo) > 1
    lines = ["# OPD comparison grid", "", _intro(header, several), ""]
    if not several:
        return "\n".join(lines + _zoo_tables(pooled, groups, diagnostics, "##"))
    for zoo, agg in per_zoo.items():
        lines += [f"## Zoo build seed {zoo}", ""] + _zoo_tables(agg, groups, diagnostics, "###")
    return "\n".join(lines + _pooled_tables(per_zoo, pooled))


def plot(agg: dict[str, dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """`success.png` (eval success per row and task, error bars one SE of the mean, none for a single run) and
    `curves.png` (every curve, mean over runs per step) under `out_dir`; returns the paths written."""
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
            stats = [agg[n]["success"].get(key) for n in names]
            ax.bar([i + j * width for i in range(len(names))],
                   [100 * s["mean"] if s else float("nan") for s in stats], width,
                   yerr=[100 * s["se"] if s and s["se"] is not None else 0.0 for s in stats], capsize=3,
                   label=key.split("/")[0])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
        ax.set_ylabel("eval success % (mean ± SE over runs)")
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
