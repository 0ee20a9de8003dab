"""Per-level and per-subject eval success: `episode_rows` + `summarize` keys, counts, key-safe names, the table."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from envs.math import MathEnv
from opd_agents.run.evaluation import episode_rows, key_safe, print_table, summarize


def episode(success: bool, **info: object) -> SimpleNamespace:
    """The two fields of a rollout `Episode` that evaluation reads."""
    return SimpleNamespace(success=success, info=info)


def test_key_safe_names() -> None:
    assert key_safe("Counting & Probability") == "counting_probability"
    assert key_safe("Intermediate Algebra") == "intermediate_algebra"
    assert key_safe(" Precalculus ") == "precalculus"
    assert key_safe(3) == "3"


def test_level_and_subject_breakdown_with_counts() -> None:
    episodes = [
        episode(True, level=1, subject="Algebra"),
        episode(False, level=1, subject="Algebra"),
        episode(True, level=5, subject="Counting & Probability"),
        episode(False, level=5, subject="Intermediate Algebra"),
        episode(True),  # e.g. a GSM8K item: no level, no subject -> only in the overall rate
    ]
    out = summarize(episode_rows(episodes, k=1), k=1)
    assert out["success"] == 3 / 5 and out["episodes"] == 5.0
    assert out["level_1/success"] == 0.5 and out["level_1/episodes"] == 2.0
    assert out["level_5/success"] == 0.5 and out["level_5/episodes"] == 2.0
    assert out["subject_algebra/success"] == 0.5 and out["subject_algebra/episodes"] == 2.0
    assert out["subject_counting_probability/success"] == 1.0
    assert out["subject_intermediate_algebra/success"] == 0.0
    assert out["subject_intermediate_algebra/episodes"] == 1.0
    assert not any(key.startswith("type/") for key in out)


def test_breakdown_is_pass_at_1_over_items_and_keeps_existing_keys() -> None:
    # Two items × k=2 samples, item-major; the breakdown counts sample 0 of each item, like `success`.
    episodes = [episode(True, level=2, task_type="t"), episode(False, level=2, task_type="t"),
                episode(False, level=3, task_type="t"), episode(True, level=3, task_type="t")]
    rows = episode_rows(episodes, k=2)
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    out = summarize(rows, k=2)
    assert out == {"success": 0.5, "episodes": 2.0, "avg@2": 0.5, "type/t": 0.5,
                   "level_2/success": 1.0, "level_2/episodes": 1.0, "level_3/success": 0.0, "level_3/episodes": 1.0}


def test_rows_without_breakdown_fields_summarize_as_before() -> None:
    rows = [{"index": 0, "sample": 0, "success": True}, {"index": 1, "sample": 0, "success": False,
                                                          "level": None, "subject": ""}]
    assert summarize(rows, k=1) == {"success": 0.5, "episodes": 2.0}


def test_math_env_info_feeds_the_breakdown(tmp_path: Path) -> None:
    rows = [{"problem": "1 + 1?", "answer": "2", "solution": "\\boxed{2}", "level": 1, "subject": "Prealgebra",
             "unique_id": "a"},
            {"problem": "2 + 2?", "answer": "4", "solution": "\\boxed{4}", "level": 4, "subject": "Number Theory",
             "unique_id": "b"}]
    path = tmp_path / "math500.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = MathEnv(data_path=path, data_format="math500", split="all")
    episodes = []
    for index, response in enumerate(["\\boxed{2}", "\\boxed{5}"]):
        _, reset_info = env.reset(options={"index": index})
        assert reset_info["subject"] == rows[index]["subject"] and reset_info["level"] == rows[index]["level"]
        *_, info = env.step(response)
        episodes.append(SimpleNamespace(success=info["success"], info=info))
    out = summarize(episode_rows(episodes, k=1), k=1)
    assert out["level_1/success"] == 1.0 and out["level_4/success"] == 0.0
    assert out["subject_prealgebra/success"] == 1.0 and out["subject_number_theory/episodes"] == 1.0


def test_table_shows_breakdown_rows_without_counts() -> None:
    summary = {
        "before": {"math": {"episodes": 2.0, "success": 0.5, "level_1/success": 1.0, "level_1/episodes": 1.0,
                            "subject_number_theory/success": 0.0, "subject_number_theory/episodes": 1.0}},
        "final": {"math": {"episodes": 2.0, "success": 1.0, "level_1/success": 1.0, "level_1/episodes": 1.0,
                           "subject_number_theory/success": 1.0, "subject_number_theory/episodes": 1.0}},
    }
    console = Console(width=80, record=True)
    print_table(summary, console)
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    level = next(line for line in lines if "level_1" in line)
    assert "100.0" in level and "/success" not in level
    subject = next(line for line in lines if "subject_number_theory" in line)
    assert "0.0" in subject and "100.0" in subject
    assert not any("episodes" in line for line in lines)
