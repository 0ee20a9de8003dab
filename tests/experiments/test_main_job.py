"""The main-job driver (`experiments.main_job`) without training: a finished run is reused (no subprocess), a new
one is the user's command line, and the summary — per-task losses, the zoo manifests, the before → after table with
the --min-gain marks, the exit code — is checked on crafted eval.json / metrics.jsonl / zoo_manifest.json files."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import main_job
from opd_agents.run.evaluation import verdict
from opd_agents.run.provenance import portable_path
from tests.run.test_train_e2e import tiny_run_data

_real_run = subprocess.run


def _no_subprocess(command, **kwargs):
    if command[0] == "git":  # provenance.code_version: the commit the summary records
        return _real_run(command, **kwargs)
    raise AssertionError("a training subprocess was started")


def _manifest(build_seed: int, build_seconds: float, success: dict[str, dict[str, float]]) -> dict:
    """A zoo_manifest.json as the zoo build writes it (with fields the summary leaves out: parameters, demos)."""
    models = {name: {"parameters": 1234, "steps": 100 + i, "budget_bound": False, "train_seconds": 5.0 + i,
                     "eval_success": scores, "weights_sha256": f"sha{i}", "selection": None}
              for i, (name, scores) in enumerate(success.items())}
    return {"build_version": f"v{build_seed}", "build_seed": build_seed, "build_seconds": build_seconds,
            "machine": {"cpu": "test cpu"}, "eval": {"math": {"split": "eval", "problems": 10}},
            "demonstration_seconds": 1.0, "models": models}


def _zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Zoo folders under tmp_path instead of the cache: zoo 0 built (manifest and marker), any other absent."""
    from opd_agents.zoo.paths import MARKER

    monkeypatch.setattr(main_job, "zoo_folder", lambda zoo_seed: tmp_path / "zoo" / f"seed{zoo_seed}")
    folder = tmp_path / "zoo" / "seed0"
    folder.mkdir(parents=True)
    (folder / "zoo_manifest.json").write_text(json.dumps(_manifest(0, 491.1, {
        "math-teacher": {"math": 0.995}, "student": {"math": 0.2}})))
    (folder / MARKER).write_text("")
    return folder


def test_loss_summary_averages_each_tasks_first_and_last_five_steps():
    # Alternating training: a step trains one task, so each task's loss is logged on its own steps only.
    records = [{"step": s, "math/train/loss": float(8 - s)} for s in range(1, 8)]  # 7, 6, …, 1
    records += [{"step": s, "alfworld/train/loss": float(s)} for s in (8, 9, 10)]  # 8, 9, 10
    records.append({"step": 11, "train/grad_norm": 2.0})  # no task's loss
    out = main_job.loss_summary(records, ["math", "alfworld", "webshop"])
    assert out == {"math": {"steps": 7, "loss_first5": 5.0, "loss_last5": 3.0},  # (7+6+5+4+3)/5, (5+4+3+2+1)/5
                   "alfworld": {"steps": 3, "loss_first5": 9.0, "loss_last5": 9.0}}  # fewer than 5: all of them
    assert main_job.loss_summary([], ["math"]) == {}


def test_zoo_summary_keeps_the_manifests_numbers_and_marks_an_unbuilt_zoo(tmp_path, monkeypatch):
    folder = _zoo(tmp_path, monkeypatch)
    zoo = main_job.zoo_summary(0)
    assert zoo["folder"] == portable_path(folder) == ".../zoo/seed0"
    assert zoo["build_version"] == "v0" and zoo["build_seed"] == 0
    assert zoo["build_seconds"] == 491.1 and zoo["eval"] == {"math": {"split": "eval", "problems": 10}}
    assert zoo["models"]["student"] == {"steps": 101, "budget_bound": False, "train_seconds": 6.0,
                                        "eval_success": {"math": 0.2}, "weights_sha256": "sha1", "selection": None}
    assert list(zoo["models"]) == ["math-teacher", "student"]  # the manifest's order: the table's columns
    old = _manifest(0, 300.0, {"student": {"math": 0.2}})
    del old["build_seed"]  # a manifest from before build seeds: the default build, seed 0
    (folder / "zoo_manifest.json").write_text(json.dumps(old))
    assert main_job.zoo_summary(0)["build_seed"] == 0
    assert main_job.zoo_summary(7) == {"folder": ".../zoo/seed7", "complete": False}


def test_run_main_job_reuses_a_run_with_a_verdict_and_otherwise_runs_the_users_command(tmp_path, monkeypatch):
    _zoo(tmp_path, monkeypatch)
    out = tmp_path / "runs"
    done = out / "z0-s0"
    done.mkdir(parents=True)
    (done / "eval.json").write_text(json.dumps({"before": {}, "final": {}, "verdict": {}}))
    monkeypatch.setattr(main_job.subprocess, "run", _no_subprocess)
    assert main_job.run_main_job(Path("c.yaml"), 0, 0, out, 60.0) == {
        "name": "z0-s0", "dir": ".../runs/z0-s0", "status": "done", "reused": True}
    # A run this driver trained keeps its record: a reuse reports the commit and wall time it trained with.
    (done / main_job.RUN_RECORD).write_text(json.dumps({"wall_seconds": 12.5, "built_zoo": True, "commit": "abc",
                                                        "dirty": False}))
    assert main_job.run_main_job(Path("c.yaml"), 0, 0, out, 60.0) == {
        "name": "z0-s0", "dir": ".../runs/z0-s0", "status": "done", "reused": True, "wall_seconds": 12.5,
        "built_zoo": True, "commit": "abc", "dirty": False}

    commands = []

    def fake_run(command, timeout, **kwargs):
        if command[0] == "git":
            return _real_run(command, timeout=timeout, **kwargs)
        commands.append((command, timeout))
        return subprocess.CompletedProcess(command, returncode=3)

    monkeypatch.setattr(main_job.subprocess, "run", fake_run)
    (out / "z1-s2").mkdir()
    (out / "z1-s2" / "eval.json").write_text(json.dumps({"before": {}}))  # interrupted: no verdict yet
    run = main_job.run_main_job(Path("c.yaml"), 1, 2, out, 60.0)
    assert commands == [([sys.executable, "-m", "opd_agents.train", "c.yaml", "run.zoo_seed=1", "run.seed=2",
                          f"run.output_dir={out}", "run.name=z1-s2", "--resume"], 60.0)]
    assert run["status"] == "failed (3)" and run["built_zoo"] is True and run["reused"] is False  # zoo 1: unbuilt
    assert isinstance(run["wall_seconds"], float) and run["dir"] == ".../runs/z1-s2"
    assert not (out / "z1-s2" / main_job.RUN_RECORD).exists()  # a failed run leaves no record to reuse
    assert set(run) >= {"commit", "dirty"}

    def timing_out(command, timeout, **kwargs):
        if command[0] == "git":
            return _real_run(command, timeout=timeout, **kwargs)
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(main_job.subprocess, "run", timing_out)
    run = main_job.run_main_job(Path("c.yaml"), 0, 1, out, 60.0)  # a fresh run folder: no --resume; zoo 0 built
    assert run["status"] == "failed (timeout)" and run["built_zoo"] is False


def _verdict(before: float, after: float, gain_se: float | None, before_se: float = 0.05,
             after_se: float = 0.05) -> dict:
    return {"items": 100, "before": before, "after": after, "gain": after - before, "before_se": before_se,
            "after_se": after_se, "gain_se": gain_se, "beyond_noise": None if gain_se is None else True}


def test_to_markdown_rows_show_before_after_gain_marks_wall_time_and_zoos():
    zoo0 = {"build_seed": 0, "build_seconds": 491.1,
            "models": {"math-teacher": {"eval_success": {"math": 0.995}},
                       "student": {"eval_success": {"math": 0.425, "alfworld": 0.6}}}}
    zoo1 = {"build_seed": 1, "build_seconds": 342.2,
            "models": {"math-teacher": {"eval_success": {"math": 1.0}},
                       "student": {"eval_success": {"math": 0.575, "alfworld": 0.478}}}}
    runs = [
        {"zoo_seed": 0, "seed": 0, "status": "done", "wall_seconds": 278.1, "built_zoo": False,
         "eval": {"verdict": {"math": _verdict(0.425, 0.7, 0.027, 0.0247, 0.0229),
                              "alfworld": _verdict(0.6, 0.62, 0.03, 0.05, 0.049)}}},
        {"zoo_seed": 1, "seed": 0, "status": "done", "wall_seconds": 601.4, "built_zoo": True,
         "eval": {"verdict": {"math": _verdict(0.0, 1.0, None, 0.0, 0.0)}}},  # one item: no paired SE; no alfworld
        {"zoo_seed": 1, "seed": 1, "status": "failed (timeout)", "wall_seconds": 3600.0, "built_zoo": False},
        {"zoo_seed": 0, "seed": 1, "status": "done", "reused": True},  # reused: its wall time is not this job's
    ]
    summary = {"config": "configs/alternating.yaml", "zoos": [zoo0, zoo1], "seeds": [0, 1],
               "tasks": ["math", "alfworld"], "runs": runs}
    md = main_job.to_markdown(summary, 5.0)
    lines = md.splitlines()
    assert lines[0] == "# The main job on 2 zoos × 2 seeds" and "✓ = gain ≥ 5 points" in md
    assert ("| zoo | seed | math before → after | math gain | alfworld before → after | alfworld gain | wall s | |"
            in lines)
    assert ("| 0 | 0 | 42.5 ± 2.5 → 70.0 ± 2.3 | +27.5 ± 2.7 ✓ | 60.0 ± 5.0 → 62.0 ± 4.9 | +2.0 ± 3.0 ✗ | 278.1 "
            "| done |") in lines
    assert "| 1 | 0 | 0.0 ± 0.0 → 100.0 ± 0.0 | +100.0 ✓ | – | – | 601.4 (incl. build) | done |" in lines
    assert "| 1 | 1 | – | – | – | – | 3600.0 | failed (timeout) |" in lines
    assert "| 0 | 1 | – | – | – | – | – | done |" in lines
    assert lines[-4:] == ["| zoo | build s | math-teacher | student |", "| --- | --- | --- | --- |",
                          "| 0 | 491.1 | 99.5 | 42.5 / 60.0 |", "| 1 | 342.2 | 100.0 | 57.5 / 47.8 |"]
    assert "+2.0 ± 3.0 ✓" in main_job.to_markdown(summary, 2.0)  # the mark is the --min-gain target


def test_fidelity_summary_counts_the_probes_and_their_cosines():
    records = [{"step": 1, "fidelity/cosine": 0.9}, {"step": 2}, {"step": 6, "fidelity/cosine": 0.7}]
    assert main_job.fidelity_summary(records) == {"probes": 2, "cosine_mean": pytest.approx(0.8), "cosine_min": 0.7,
                                                  "cosine_last": 0.7}
    assert main_job.fidelity_summary([{"step": 1}]) is None


def test_exit_code_needs_every_run_done_and_every_gain_at_the_target():
    def run(status: str, *gains: float) -> dict:
        verdicts = {t: _verdict(0.4, 0.4 + g, 0.02) for t, g in zip(("math", "alfworld"), gains)}
        return {"status": status} | ({"eval": {"verdict": verdicts}} if gains else {})

    tasks = ["math", "alfworld"]
    assert main_job.exit_code([run("done", 0.25, 0.125), run("done", 0.0625, 0.5)], tasks, 5.0) == 0
    assert main_job.exit_code([run("done", 0.25, 0.125), run("done", 0.0625, 0.5)], tasks, 10.0) == 1  # 6.25 < 10
    assert main_job.exit_code([run("done", 0.25, -0.125)], tasks, 5.0) == 1  # a loss on one task
    assert main_job.exit_code([run("done", 0.25, 0.125), run("failed (1)")], tasks, 5.0) == 1
    assert main_job.exit_code([run("failed (timeout)", 0.25, 0.125)], tasks, 5.0) == 1


def _finished_run(root: Path, before: list[int], after: list[int], losses: list[float]) -> dict:
    """A run folder as `opd_agents.train` leaves it: eval.json with its verdict, metrics.jsonl with the losses."""
    root.mkdir(parents=True)
    rate = sum(before) / len(before)
    evaluation = {"before": {"math": {"episodes": float(len(before)), "success": rate}},
                  "final": {"math": {"episodes": float(len(after)), "success": sum(after) / len(after)}},
                  "verdict": {"math": verdict(before, after)}}
    (root / "eval.json").write_text(json.dumps(evaluation))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "math/train/loss": v}) + "\n"
                                                for s, v in enumerate(losses, 1)))
    return evaluation


def test_main_summarises_finished_runs_without_training(tmp_path, monkeypatch, capsys):
    config = tmp_path / "job.yaml"  # model folders need not exist: load_config does not look
    config.write_text(yaml.safe_dump(tiny_run_data(tmp_path / "unused", {"student": tmp_path / "s",
                                                                         "teacher": tmp_path / "t"}, "job", 2)))
    _zoo(tmp_path, monkeypatch)
    monkeypatch.setattr(main_job.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(main_job, "machine", lambda: {"cpu": "test cpu"})
    out, results = tmp_path / "runs", tmp_path / "results"
    before = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # 20%
    first = _finished_run(out / "z0-s0", before, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0.9, 0.8, 0.7])  # 40%
    _finished_run(out / "z0-s1", before, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0.5])  # 30%
    argv = ["--config", str(config), "--zoos", "0", "--seeds", "0", "1", "--out", str(out), "--results",
            str(results), "--min-gain", "15"]
    assert main_job.main(argv) == 1  # z0-s1 gained 10 points, short of 15
    summary = json.loads((results / "summary.json").read_text())
    assert summary["tasks"] == ["math"] and summary["seeds"] == [0, 1] and summary["min_gain_points"] == 15.0
    assert summary["machine"] == {"cpu": "test cpu"} and summary["zoos"][0]["build_seconds"] == 491.1
    run = summary["runs"][0]
    assert {k: run[k] for k in ("name", "status", "reused", "zoo_seed", "seed")} == {
        "name": "z0-s0", "status": "done", "reused": True, "zoo_seed": 0, "seed": 0}
    assert run["eval"] == first and run["config_sha256"] is None  # crafted runs saved no config.yaml
    assert set(summary["code"]) == {"commit", "dirty"}
    assert str(tmp_path) not in (results / "summary.json").read_text()  # no machine path in the artefact
    assert run["losses"] == {"math": {"steps": 3, "loss_first5": pytest.approx(0.8), "loss_last5": pytest.approx(0.8)}}
    md = (results / "summary.md").read_text()
    assert capsys.readouterr().out == md + "\n"  # the table as written, and no `$ python -m opd_agents.train …`
    # z0-s0: 2/10 → 4/10, item differences two 1s and eight 0s: paired SE sqrt((2·0.8² + 8·0.2²) / 9 / 10) = 13.3
    se0 = math.sqrt((2 * 0.8 ** 2 + 8 * 0.2 ** 2) / 9 / 10)
    assert f"| 0 | 0 | 20.0 ± 12.6 → 40.0 ± 15.5 | +20.0 ± {100 * se0:.1f} ✓ | – | done |" in md
    assert "| 0 | 1 | 20.0 ± 12.6 → 30.0 ± 14.5 | +10.0 ± 10.0 ✗ | – | done |" in md  # SE sqrt(0.9 / 9 / 10)
    assert "| 0 | 491.1 | 99.5 | 20.0 |" in md
    assert main_job.main(argv[:-1] + ["5"]) == 0
    assert "+10.0 ± 10.0 ✓" in (results / "summary.md").read_text()


def test_a_gain_of_exactly_the_target_meets_it_despite_float_rounding():
    assert 100 * (0.3 - 0.2) < 10 and main_job.meets(0.3 - 0.2, 10.0)
    assert main_job.meets(0.475 - 0.425, 5.0) and not main_job.meets(0.0499, 5.0)
    verdicts = {"math": _verdict(0.2, 0.3, 0.02)}
    assert main_job.exit_code([{"status": "done", "eval": {"verdict": verdicts}}], ["math"], 10.0) == 0


def test_exit_code_fails_a_done_run_without_a_verdict_for_every_task():
    full = {"math": _verdict(0.2, 0.5, 0.02), "alfworld": _verdict(0.2, 0.5, 0.02)}
    assert main_job.exit_code([{"status": "done", "eval": {"verdict": full}}], ["math", "alfworld"], 5.0) == 0
    partial = {"math": full["math"]}
    assert main_job.exit_code([{"status": "done", "eval": {"verdict": partial}}], ["math", "alfworld"], 5.0) == 1
    assert main_job.exit_code([{"status": "done"}], ["math"], 5.0) == 1  # no eval.json at all


def test_to_markdown_lists_an_unbuilt_zoo_instead_of_failing():
    built = {"build_seed": 0, "build_seconds": 491.1, "models": {"student": {"eval_success": {"math": 0.425}}}}
    summary = {"config": "c.yaml", "zoos": [{"folder": "/cache/abc", "complete": False}, built], "seeds": [0],
               "tasks": ["math"], "runs": [{"zoo_seed": 1, "seed": 0, "status": "failed (1)"}]}
    lines = main_job.to_markdown(summary, 5.0).splitlines()
    assert lines[-4:] == ["| zoo | build s | student |", "| --- | --- | --- |", "| /cache/abc | not built | – |",
                          "| 0 | 491.1 | 42.5 |"]
