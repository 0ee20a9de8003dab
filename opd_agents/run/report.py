"""A run's report: one self-contained `report.html` (figures embedded) a person opens after the main job.

What it holds, each part only where the run has it: the run's name and loss, steps done; per task the student's eval
success before → after with standard errors and the paired gain (eval.json's verdict, `verdict_line`), and the
teacher's level; the signal-fidelity probe (how many probes, their cosine with the exact reverse-KL gradient: last,
mean, min); for an async run the staleness histogram with the probe's cosine and the off-policy weights per
staleness; then every figure of `plots/`. Everything shown is escaped; nothing is fetched from the network.
"""
from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path
from typing import Any

from envs.user_files import MIB, UserFileError, read_bytes, read_text
from opd_agents import safe_yaml
from opd_agents.run.evaluation import verdict_line
from opd_agents.run.plot import _number, plot_run, read_points, stored_object, teacher_levels
from opd_agents.run.rundir import atomic_write_text

EVAL_MAX_BYTES = 64 * MIB
FIGURE_MAX_BYTES = 16 * MIB

_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
          "th:first-child,td:first-child{text-align:left}img{max-width:100%;margin:1em 0}"
          ".note{color:#555;font-size:90%}")


def _config(run_root: Path) -> dict[str, Any]:
    """The run's saved config.yaml as data, {} without a readable one."""
    try:
        data = safe_yaml.load(read_text(run_root / "config.yaml", safe_yaml.MAX_BYTES, "saved config"))
    except (UserFileError, ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _success(summary: dict[str, Any], label: str, task: str) -> float | None:
    entry = summary.get(label)
    return _number(entry.get(task, {}).get("success")) if isinstance(entry, dict) and isinstance(
        entry.get(task), dict) else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def eval_section(summary: dict[str, Any], teacher: dict[str, float]) -> str:
    tasks = sorted({t for label in ("before", "final", "teacher") if isinstance(summary.get(label), dict)
                    for t in summary[label]} | set(teacher))
    if not tasks:
        return "<p class=note>No evaluation yet.</p>"
    rows = ["<tr><th>task</th><th>student before</th><th>student after</th><th>teacher</th></tr>"]
    for task in tasks:
        level = teacher.get(task, _success(summary, "teacher", task))
        rows.append(f"<tr><td>{html.escape(task)}</td><td>{_pct(_success(summary, 'before', task))}</td>"
                    f"<td>{_pct(_success(summary, 'final', task))}</td><td>{_pct(level)}</td></tr>")
    verdicts = summary.get("verdict") if isinstance(summary.get("verdict"), dict) else {}
    lines = []
    for task, v in sorted(verdicts.items()):
        try:
            lines.append(f"<li>{html.escape(verdict_line(task, v))}</li>")
        except (KeyError, TypeError, ValueError):  # a damaged verdict is left out, the table still shows
            continue
    return "<table>" + "".join(rows) + "</table>" + (f"<ul>{''.join(lines)}</ul>" if lines else "")


def fidelity_section(points: list[tuple[int, dict[str, Any]]]) -> str:
    probes = [(step, c) for step, r in points if (c := _number(r.get("fidelity/cosine"))) is not None]
    if not probes:
        return "<p class=note>No signal-fidelity probe in this run (fidelity.every = 0).</p>"
    cosines = [c for _, c in probes]
    return (f"<p>{len(probes)} probes (steps {probes[0][0]}–{probes[-1][0]}); cosine of the loss's gradient with the "
            f"exact full-vocabulary reverse-KL gradient: last {cosines[-1]:.3f}, mean {statistics.fmean(cosines):.3f},"
            f" min {min(cosines):.3f} (1 = the same direction; at or below fidelity.min_cosine a probe fails).</p>")


def pipeline_section(points: list[tuple[int, dict[str, Any]]]) -> str:
    """`run.pipeline: async`: the staleness histogram (steps per staleness), and per staleness the signal-fidelity
    probe's mean cosine and the off-policy correction's mean weight statistics, so stale and fresh steps compare."""
    lags = {step: int(lag) for step, r in points if (lag := _number(r.get("pipeline/staleness"))) is not None}
    by_lag: dict[int, list[dict[str, Any]]] = {}
    for step, r in points:  # a step's probe may sit in a record of its own
        if step in lags:
            by_lag.setdefault(lags[step], []).append(r)
    if not by_lag:
        return "<p class=note>A sync run (run.pipeline = sync): every step trains on its own weights' samples.</p>"
    columns = [("fidelity/cosine", "fidelity cosine"), ("train/offpolicy/raw_weight_mean", "raw weight mean"),
               ("train/offpolicy/ess_fraction", "ESS fraction"),
               ("train/offpolicy/outside_cap_fraction", "truncated / dropped"),
               ("train/offpolicy/log_ratio_abs_mean", "|log ratio| per token")]
    rows = ["<tr><th>staleness</th><th>steps</th>" + "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
            + "</tr>"]
    for lag in sorted(by_lag):
        cells = []
        for key, _ in columns:
            seen = [v for r in by_lag[lag] if (v := _number(r.get(key))) is not None]
            cells.append(f"{statistics.fmean(seen):.4f} ({len(seen)})" if seen else "–")
        steps = sum(1 for v in lags.values() if v == lag)
        rows.append(f"<tr><td>{lag}</td><td>{steps}</td>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "</tr>")
    return ("<table>" + "".join(rows) + "</table><p class=note>Per staleness (updates between the weights that "
            "sampled a step and the weights it trains): the mean over those steps, (how many steps logged it). "
            "Off-policy columns need loss.off_policy_correction; fidelity needs fidelity.every.</p>")


def write_report(run_root: Path, figures: list[Path]) -> Path:
    """Write run_root/report.html from the run's files and the figure PNGs `figures`; its path."""
    points = read_points(run_root)
    summary = stored_object(run_root / "eval.json", EVAL_MAX_BYTES, "run evaluation")
    steps = max((step for step, r in points if any(k.startswith("train/") for k in r)), default=0)
    config = _config(run_root)
    loss = config.get("loss", {}).get("name") if isinstance(config.get("loss"), dict) else None
    planned = config.get("run", {}).get("steps") if isinstance(config.get("run"), dict) else None
    parts = [f"<h1>Run {html.escape(run_root.name)}</h1>",
             f"<p>{steps}{f' of {planned}' if isinstance(planned, int) else ''} training steps logged"
             f"{' · loss ' + html.escape(str(loss)) if loss else ''}. "
             "Files: <code>metrics.jsonl</code>, <code>eval.json</code>, <code>plots/</code>, "
             "<code>checkpoints/</code>.</p>",
             "<h2>Evaluation</h2>", eval_section(summary, teacher_levels(run_root)),
             "<h2>Signal fidelity</h2>", fidelity_section(points),
             "<h2>Pipeline</h2>", pipeline_section(points), "<h2>Curves</h2>"]
    for path in figures:
        try:
            data = base64.b64encode(read_bytes(path, FIGURE_MAX_BYTES, "figure")).decode()
        except UserFileError:
            continue
        parts.append(f"<h3>{html.escape(path.stem.replace('_', ' '))}</h3>"
                     f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(run_root.name)} — opd-agents run"
            f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    out = run_root / "report.html"
    atomic_write_text(out, page)
    return out


def render_run(run_root: Path) -> list[Path]:
    """The run's figures (`plot.plot_run`) and then its report.html; every path written, the report last."""
    figures = plot_run(run_root)
    return [*figures, write_report(Path(run_root), figures)]
