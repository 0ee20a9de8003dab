"""The comparison grid on tiny models: runs through the real trainer, writes results.json/.md and plots, explains
rows it cannot run, records failures without stopping, and a second invocation skips finished runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from experiments import grid
from tests.run.test_train_e2e import tiny_run_data


@pytest.fixture(autouse=True)
def _ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _config(tmp_path: Path, dirs: dict[str, Path]) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run_data(tmp_path / "unused", dirs, "tiny", 2)))
    return path


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_failures_and_unsupported_rows_are_reported_not_fatal(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    class Boom:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def fit(self) -> None:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(grid, "Trainer", Boom)
    out = tmp_path / "grid"
    argv = ["--config", str(_config(tmp_path, tiny_model_dirs)), "--seeds", "0", "--out", str(out),
            "--rows", "sampled,topk_mask"]
    assert grid.main(argv) == 1
    data = _results(out)
    assert data["runs"]["sampled"]["0"]["status"] == "failed"
    assert "simulated crash" in (out / "runs" / "sampled-s0" / "grid_error.txt").read_text()
    assert "not run: no special tokens" in data["rows"]["topk_mask"]["notes"][0]
    md = (out / "results.md").read_text()
    assert "RuntimeError: simulated crash" in md and "`topk_mask`" in md
    capsys.readouterr()
    assert grid.main(argv) == 1  # a failed run is not retried by default ...
    assert "[grid] running" not in capsys.readouterr().out
    assert grid.main(argv + ["--retry-failed"]) == 1  # ... but is with --retry-failed
    assert "[grid] running" in capsys.readouterr().out
    # A config a row cannot use is explained (preflight's message), not dropped; the mask row runs with tokens.
    bad = ["--set", "teachers.t.model=/nonexistent/teacher", "--special-tokens", "<|im_end|>"]
    assert grid.main(argv[:-3] + [str(tmp_path / "bad"), "--rows", "topk_mask"] + bad) == 0
    run = _results(tmp_path / "bad")["runs"]["topk_mask"]["0"]
    assert run["status"] == "invalid" and "teachers.t.model" in run["error"]


@pytest.mark.slow
def test_reduced_grid_end_to_end_then_skips_finished_runs(tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "grid"
    argv = ["--config", str(_config(tmp_path, tiny_model_dirs)), "--seeds", "0", "--out", str(out), "--steps", "2",
            "--rows", "student,sampled,topk,teacher", "--set", "eval.teacher_reference=true"]
    assert grid.main(argv) == 0
    data = _results(out)
    assert [r["label"] for r in data["rows"].values()] == [r.label for r in grid.ROWS
                                                          if r.name in ("student", "sampled", "topk", "teacher")]
    for name in ("student", "sampled", "topk", "teacher"):
        row = data["rows"][name]
        assert row["seeds_done"] == 1 and 0.0 <= row["success"]["math/success"][0] <= 1.0, name
    assert {"train/grad_norm", "train/entropy", "train/gap_mean"} <= set(data["rows"]["topk"]["diagnostics"])
    assert "train/clip_fraction" in data["rows"]["sampled"]["diagnostics"]
    topk_cfg = yaml.safe_load((out / "runs" / "topk-s0" / "config.yaml").read_text())
    assert topk_cfg["loss"]["k"] == 32 and topk_cfg["run"]["steps"] == 2 and topk_cfg["rollout"]["top_p"] == 0.9
    md = (out / "results.md").read_text()
    assert all(f"(`{n}`)" in md for n in ("student", "sampled", "topk", "teacher"))
    assert (out / "plots" / "success.png").is_file() and (out / "plots" / "curves.png").is_file()

    metrics = out / "runs" / "topk-s0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    capsys.readouterr()
    assert grid.main(argv) == 0
    assert "[grid] running" not in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == before
    assert all(r.get("skipped") for seeds in _results(out)["runs"].values() for r in seeds.values())
