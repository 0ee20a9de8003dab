"""The end-of-run table: one column per policy, one row per task and per task type, readable at 80 columns."""
from __future__ import annotations

from rich.console import Console

from opd_agents.run.evaluation import print_table


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
