"""The end-of-run table (one column per policy, one row per task and per task type, readable at 80 columns) and the
before -> after verdict with its paired standard error."""
from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest
from rich.console import Console

from opd_agents.run.evaluation import Evaluator, print_table, verdict, verdict_line


def test_table_lists_policies_as_columns_and_task_types_as_rows():
    summary = {
        "before": {"alfworld": {"episodes": 30.0, "success": 0.1, "type/pick_and_place_simple": 0.2},
                   "math": {"episodes": 400.0, "success": 0.3475}},
        "final": {"alfworld": {"episodes": 30.0, "success": 0.2, "type/pick_and_place_simple": 0.4},
                  "math": {"episodes": 400.0, "success": 0.37}},
        "teacher": {"math": {"episodes": 400.0, "success": 1.0}},
    }
    console = Console(width=80, record=True)
    print_table(summary, console)
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if "student (before)" in line)
    assert "student (after)" in header and "teacher" in header
    math = next(line for line in lines if line.strip("│ ").startswith("math"))
    assert "34.8" in math and "37.0" in math and "100.0" in math
    pick = next(line for line in lines if "pick_and_place_simple" in line)
    assert "20.0" in pick and "40.0" in pick and "-" in pick  # no teacher row for ALFWorld: shown as "-"
    assert not any("episodes" in line for line in lines)


def test_verdict_pairs_the_items_and_brute_forces_its_standard_error():
    before = [0, 1, 0, 0, 1, 0, 0, 0, 1, 0]
    after = [1, 1, 1, 1, 1, 0, 1, 0, 1, 0]  # 4 items won, none lost
    v = verdict(before, after)
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / 10
    assert v["gain"] == pytest.approx(0.4) and v["items"] == 10
    assert v["gain_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(10))
    assert v["before_se"] == pytest.approx(math.sqrt(0.3 * 0.7 / 10))
    assert v["beyond_noise"] == (mean > 2 * v["gain_se"]) and v["beyond_noise"]
    assert "larger than the eval split's noise" in verdict_line("math", v) and "+40.0 points" in verdict_line("math", v)
    # one item won, one lost: no gain, within the noise
    flat = verdict([1, 0, 0, 0], [0, 1, 0, 0])
    assert flat["gain"] == 0 and not flat["beyond_noise"] and "within" in verdict_line("alfworld", flat)
    # identical outcomes: zero variance, zero gain, no claim
    assert verdict([1, 0], [1, 0])["beyond_noise"] is False
    assert verdict([1], [0])["gain_se"] is None and "too few" in verdict_line("x", verdict([1], [0]))


def test_summary_stores_the_verdict_and_prints_it(tmp_path):
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.run_dir = SimpleNamespace(root=tmp_path)
    evaluator.summary = {"before": {"math": {"success": 0.25}}, "final": {"math": {"success": 0.75}}}
    evaluator.items = {"before": {"math": [0, 0, 0, 1]}, "final": {"math": [1, 1, 0, 1]}}
    evaluator.item_ids, evaluator.names = {"math": [0, 2, 5, 7]}, {}
    console = Console(width=200, record=True)
    summary = evaluator.write_summary(console)
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert stored == summary and stored["verdict"]["math"]["gain"] == pytest.approx(0.5)
    assert "math: 25.0% (±21.7) -> 75.0% (±21.7) on 4 items: +50.0 points" in console.export_text()


def test_progress_lines_come_at_most_every_interval_and_always_at_the_end(monkeypatch):
    from rich.console import Console

    from opd_agents.run import evaluation

    clock = iter([0.0, 1.0, 40.0, 41.0, 42.0, 90.0])  # start, then one reading per call below
    monkeypatch.setattr(evaluation.time, "monotonic", lambda: next(clock))
    console = Console(record=True, width=200)
    lines = evaluation.ProgressLines("eval alfworld", 140, console)
    for done, ok in [(3, 1), (70, 28), (71, 28), (71, 28), (141, 56)]:  # 141: a restarted share counted twice
        lines(done, ok)
    assert console.export_text().splitlines() == ["[eval alfworld] 70/140 episodes, success 40.0% (0m40s)",
                                                  "[eval alfworld] 140/140 episodes, success 40.0% (1m30s)"]
