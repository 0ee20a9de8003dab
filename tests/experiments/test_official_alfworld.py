"""The official-games measurement (`experiments.official_alfworld`): its overrides are the config a user would write;
its table and paired tests come from the stored per-game outcomes (brute force on crafted folders); policies that
played different games are refused; finished invocations are reused."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from envs.user_files import UserFileError
from experiments import official_alfworld as oa
from opd_agents.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "alfworld"


def test_the_overrides_point_the_alfworld_evaluation_at_the_split_in_the_vocabulary():
    over = oa.overrides(Path("/data/alf"), "valid_seen", "native", 140)
    cfg = load_config(ROOT / "configs" / "alternating.yaml", over)
    tasks = {t.name: t for t in cfg.tasks}
    assert tasks["alfworld"].eval_env_kwargs == {"split": "valid_seen", "data_path": "/data/alf",
                                                 "command_vocabulary": "native"}
    assert (tasks["alfworld"].eval_episodes, tasks["math"].eval_episodes) == (140, 1)


def test_paired_comparisons_are_the_mean_difference_over_the_same_games_by_brute_force():
    before, after = [0, 0, 1, 0, 1, 0], [1, 0, 1, 1, 1, 0]
    types = ["a", "a", "a", "b", "b", "b"]
    summary = oa.summarize({"native": {"before": before, "after": after}}, types)
    row = summary["success"]["native"]["after"]
    assert row["success"] == pytest.approx(4 / 6) and row["se"] == pytest.approx(math.sqrt(4 / 6 * 2 / 6 / 6))
    assert row["type"]["b"]["success"] == pytest.approx(2 / 3)
    test = summary["paired"]["native: after vs before"]
    diffs = [a - b for a, b in zip(after, before)]
    assert test["diff"] == pytest.approx(statistics.fmean(diffs))
    assert test["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(6))
    assert test["type"]["a"]["diff"] == pytest.approx(1 / 3) and "runs" not in test
    text = oa.to_markdown(summary | {"split": "valid_seen", "games": 6, "checkpoint": "c", "config": "x", "data": "d"})
    assert "| native | after | 66.7 ± 19.2 |" in text
    assert "| native: after vs before | +33.3 ± 21.1, p = 0.175 |" in text


def _fake_run(folder: Path, policies: dict[str, list[int]], ids: list[int] | None = None) -> None:
    (folder / "eval").mkdir(parents=True)
    (folder / "eval.json").write_text("{}")
    for policy, items in policies.items():
        name = "teacher_items.json" if policy == "teacher" else "step_0.json"
        record = {"items": {"alfworld": items, "math": [1]}, "item_ids": {"alfworld": ids, "math": None}}
        (folder / "eval" / name).write_text(json.dumps(record | ({} if policy == "teacher" else {"student": {}})))


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the official ALFWorld games in ../shared/data/alfworld")
def test_finished_invocations_are_reused_and_policies_on_other_games_are_refused(tmp_path, monkeypatch):
    games = 140
    outcome = [i % 2 for i in range(games)]
    for vocabulary in oa.VOCABULARIES:
        _fake_run(tmp_path / "runs" / f"{vocabulary}-before", {"before": outcome, "teacher": outcome})
        _fake_run(tmp_path / "runs" / f"{vocabulary}-after", {"after": outcome[::-1]})
    monkeypatch.setattr(oa, "run_command", lambda *a, **k: pytest.fail("a finished invocation was rerun"))
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(DATA), "--out", str(tmp_path)]
    assert oa.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["games"] == games and all(i["reused"] for i in summary["invocations"])
    assert set(summary["paired"]) == {"native: after vs before", "unified: after vs before",
                                      "before: unified vs native", "after: unified vs native",
                                      "teacher: unified vs native"}
    assert len(summary["success"]["native"]["before"]["type"]) == 6  # every task type of valid_seen
    assert sum(r["games"] for r in summary["success"]["native"]["before"]["type"].values()) == games

    other = tmp_path / "runs" / "unified-after"
    (other / "eval" / "step_0.json").write_text(json.dumps({"student": {}, "items": {"alfworld": outcome[:10]},
                                                            "item_ids": {"alfworld": list(range(10))}}))
    with pytest.raises(UserFileError, match="played other games"):
        oa.main(argv)
