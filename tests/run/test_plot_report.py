"""A run's figures and report as a person reads them: eval success over steps with ± SE bands and the teacher's level,
per-turn KL as one heatmap (turn × step), and a self-contained report.html with the verdicts and the probe."""
from __future__ import annotations

import json
import math

import numpy as np
import yaml
from matplotlib.collections import PolyCollection
from matplotlib.image import AxesImage

from opd_agents.run import plot, report
from opd_agents.run.evaluation import verdict


def _run(tmp_path):
    records = [{"step": 0, "eval/math/success": 0.4, "eval/math/episodes": 100,
                "eval/alfworld/success": 0.5, "eval/alfworld/episodes": 20}]
    for step in range(1, 9):
        record = {"step": step, "train/loss": 1.0 / step}
        if step % 2 == 0:  # alternating: ALFWorld on even steps, 3 turns with a KL each
            record |= {f"alfworld/train/kl_mean@turn{t}": 0.1 * t + 0.01 * step for t in range(3)}
            record["alfworld/train/kl_mean@turn3+"] = 0.5
        else:
            record["math/train/kl_mean@turn0"] = 0.2  # one turn only: no heatmap for math
        if step % 4 == 1:
            record["fidelity/cosine"] = 0.8 + 0.01 * step
        records.append(record)
    records.append({"step": 8, "eval/math/success": 0.6, "eval/math/episodes": 100,
                    "eval/alfworld/success": 0.55, "eval/alfworld/episodes": 20})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "eval").mkdir()
    teacher = {"math": {"success": 0.95}, "alfworld": {"success": 0.8}}
    (tmp_path / "eval" / "teacher.json").write_text(json.dumps(teacher))
    before, after = [1] * 4 + [0] * 6, [1] * 6 + [0] * 4
    (tmp_path / "eval.json").write_text(json.dumps({
        "before": {"math": {"success": 0.4}}, "final": {"math": {"success": 0.6}},
        "teacher": {"math": {"success": 0.95}}, "verdict": {"math": verdict(before, after)}}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": {"steps": 8}, "loss": {"name": "topk_reverse_kl"}}))
    return tmp_path


def test_eval_success_has_bands_the_teacher_line_and_labelled_axes(tmp_path):
    run = _run(tmp_path)
    figures = plot.run_figures(run)
    ax = figures["eval_success"].axes[0]
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "eval success (%)"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["math teacher"].get_linestyle() == "--" and list(lines["math teacher"].get_ydata()) == [95, 95]
    assert list(lines["math (student)"].get_xdata()) == [0, 8] and list(lines["math (student)"].get_ydata()) == [40, 60]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # one per task
    math_band = next(c for c in bands if c.get_label() == "math ± 1 SE").get_paths()[0].vertices[:, 1]
    se = 100 * math.sqrt(0.4 * 0.6 / 100)
    assert np.isclose(math_band.min(), 40 - se) and np.isclose(math_band.max(), 60 + 100 * math.sqrt(0.24 / 100))


def test_per_turn_kl_is_one_heatmap_of_turn_by_step(tmp_path):
    figures = plot.run_figures(_run(tmp_path))
    fig = figures["kl_by_turn"]
    assert len(fig.axes) == 2  # the ALFWorld heatmap and its colour bar; math has one turn: none
    ax = fig.axes[0]
    (image,) = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    cells = np.asarray(image.get_array())
    assert cells.shape == (4, 4)  # turns 0, 1, 2, 3+ × ALFWorld steps 2, 4, 6, 8
    assert np.isclose(cells[1, 0], 0.1 + 0.02) and np.isclose(cells[3, 2], 0.5)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["turn 0", "turn 1", "turn 2", "turn 3+"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "6", "8"]
    assert ax.get_ylabel() == "agent turn" and fig.axes[1].get_ylabel() == "reverse KL (nats per token)"
    assert "gap_by_turn" not in figures  # no gap was logged


def test_render_run_writes_the_figures_and_a_self_contained_report(tmp_path):
    run = _run(tmp_path)
    written = {p.name for p in report.render_run(run)}
    assert {"eval_success.png", "kl_by_turn.png", "train_loss.png", "signal_fidelity.png", "report.html"} <= written
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(written) - 1 and "http" not in page
    assert "8 of 8 training steps" in page and "topk_reverse_kl" in page
    assert "<td>math</td><td>40.0%</td><td>60.0%</td><td>95.0%</td>" in page
    assert "<td>alfworld</td><td>–</td><td>–</td><td>80.0%</td>" in page
    assert "math: 40.0% (±15.5) -&gt; 60.0% (±15.5) on 10 items: +20.0 points" in page
    assert "2 probes (steps 1–5)" in page and "last 0.850, mean 0.830, min 0.810" in page


def test_an_async_runs_report_splits_fidelity_and_weights_by_staleness():
    points = [(1, {"pipeline/staleness": 0, "train/offpolicy/raw_weight_mean": 1.0}),
              (1, {"fidelity/cosine": 0.9}),  # the probe in a record of its own
              (2, {"pipeline/staleness": 1, "train/offpolicy/raw_weight_mean": 0.8}),
              (3, {"pipeline/staleness": 1, "train/offpolicy/raw_weight_mean": 1.2, "fidelity/cosine": 0.7})]
    page = report.pipeline_section(points)
    rows = page.split("<tr>")[2:]
    assert rows[0].startswith("<td>0</td><td>1</td><td>0.9000 (1)</td><td>1.0000 (1)</td>")
    assert rows[1].startswith("<td>1</td><td>2</td><td>0.7000 (1)</td><td>1.0000 (2)</td>")
    assert "sync run" in report.pipeline_section([(1, {"train/loss": 1.0})])
