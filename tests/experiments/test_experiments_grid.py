"""The comparison grid on tiny models: runs through the real trainer, writes results.json/.md and plots, explains
rows it cannot run, records failures without stopping, and a second invocation skips finished runs. On crafted
results (no training): the aggregates with their standard errors and paired tests vs `sampled`, --zoos (run folders,
the run.zoo_seed override, per-zoo and pooled aggregates), the wall time summed over invocations into one --out, and
--rerender of a stored grid from before them."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import ray
import yaml

from experiments import grid, grid_aggregate, grid_report, grid_rows
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
    assert data["runs"]["sampled"]["0"]["status"] == "failed" and data["zoos"] == [0]  # no --zoos: zoo 0
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


def test_runs_get_the_config_preflight_resolved(tmp_path, tiny_model_dirs, monkeypatch):
    """`zoo:` names are resolved by preflight; the trainer and the reference eval must get its result (they once got
    the unresolved config, and every run on `zoo:` models failed on a hub lookup of 'zoo:student')."""
    seen: dict[str, object] = {}
    resolved: list[object] = []
    real_preflight = grid.preflight

    def marking_preflight(cfg):
        resolved.append(real_preflight(cfg))
        return resolved[-1]

    class Capture:
        def __init__(self, cfg, run_dir, resume) -> None:
            seen["trainer"] = cfg

        def fit(self) -> None:
            pass

    monkeypatch.setattr(grid, "preflight", marking_preflight)
    monkeypatch.setattr(grid, "Trainer", Capture)
    monkeypatch.setattr(grid, "_reference_eval", lambda cfg, run_dir: seen.setdefault("reference", cfg))
    argv = ["--config", str(_config(tmp_path, tiny_model_dirs)), "--seeds", "0", "--out", str(tmp_path / "grid"),
            "--rows", "student,sampled"]
    grid.main(argv)
    assert len(resolved) == 2  # the reference run's and the training run's
    assert seen["reference"] is resolved[0] and seen["trainer"] is resolved[1]


@pytest.mark.slow
def test_reduced_grid_end_to_end_then_skips_finished_runs(tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "grid"
    argv = ["--config", str(_config(tmp_path, tiny_model_dirs)), "--seeds", "0", "--out", str(out), "--steps", "2",
            "--rows", "student,sampled,topk,teacher", "--set", "eval.teacher_reference=true"]
    assert grid.main(argv) == 0
    data = _results(out)
    assert [r["label"] for r in data["rows"].values()] == [r.label for r in grid_rows.ROWS
                                                          if r.name in ("student", "sampled", "topk", "teacher")]
    for name in ("student", "sampled", "topk", "teacher"):
        row = data["rows"][name]
        assert row["seeds_done"] == 1 and 0.0 <= row["success"]["math/success"]["mean"] <= 1.0, name
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


# ---- aggregates and --zoos on crafted results (no training) -------------------------------------------------------

def _crafted(zoo: int, seed: int, success: float, status: str = "done") -> dict:
    return {"zoo_seed": zoo, "seed": seed, "status": status,
            "eval": {"math": {"episodes": 10.0, "level_0/episodes": 10.0, "success": success}}}


def test_aggregate_tests_training_rows_against_sampled_and_one_seed_gets_no_se():
    rows = grid_rows.select_rows("student,sampled,topk,no_renorm")
    runs = {"student": {"0": _crafted(0, 0, 0.1), "1": _crafted(0, 1, 0.1)},
            "sampled": {"0": _crafted(0, 0, 0.30), "1": _crafted(0, 1, 0.40)},
            "topk": {"0": _crafted(0, 0, 0.45), "1": _crafted(0, 1, 0.50)},
            "no_renorm": {"0": _crafted(0, 0, 0.2), "1": _crafted(0, 1, 0.0, "failed") | {"error": "collapse"}}}
    agg = grid_aggregate.aggregate(rows, runs, {})
    assert set(agg["topk"]["success"]) == {"math/success"}  # item counts (`episodes`, `level_0/episodes`) are no rates
    assert agg["student"]["vs_sampled"] == {} and agg["sampled"]["vs_sampled"] == {}  # reference row, baseline
    topk = agg["topk"]["vs_sampled"]["math/success"]  # differences 15, 10 points: SE 2.5, t 5, df 1
    assert topk["diff"] == pytest.approx(0.125) and topk["se"] == pytest.approx(0.025)
    assert topk["p"] == pytest.approx(1 - 2 / math.pi * math.atan(5.0))
    lone = agg["no_renorm"]  # one finished seed: a mean without SE, and no test
    assert lone["seeds_done"] == 1 and lone["success"]["math/success"]["se"] is None
    assert lone["vs_sampled"]["math/success"]["n"] == 1 and lone["notes"] == ["seed 1: failed: collapse"]
    header = {"config": "c.yaml", "zoos": [0], "seeds": [0, 1], "set": [], "special_tokens": [],
              "wall_seconds": 90.0}
    md = grid_report.to_markdown({0: agg}, agg, header, grid_rows.GROUPS, grid_rows.DIAGNOSTICS)
    assert "± is one standard error of the mean" in md and "grid wall time 1.5 min" in md
    assert "| sampled-token OPD (`sampled`) | 2/2 | 35.0 ± 5.0 (30.0 / 40.0) |" in md
    assert "| top-K, no renormalisation (`no_renorm`) | 1/2 | 20.0 |" in md
    assert "| top-K, no renormalisation (`no_renorm`) | – (1 pair) |" in md
    assert f"+12.5 ± 2.5, p = {1 - 2 / math.pi * math.atan(5.0):.3f} (2 pairs)" in md
    assert "beats" not in md and "Pooled" not in md


def test_run_overrides_give_each_zoo_its_own_run_folder_and_zoo_seed(tmp_path):
    args = argparse.Namespace(set=["optim.lr=1e-3"], steps=None, out=tmp_path)
    sampled = grid_rows.select_rows("sampled")[0]
    over = grid.run_overrides(sampled, 3, 1, args, [])
    assert over[0] == "optim.lr=1e-3" and over[-4:] == ["run.zoo_seed=3", "run.seed=1", "run.name=sampled-z3-s1",
                                                        f"run.output_dir={tmp_path / 'runs'}"]
    assert "run.name=sampled-s1" in grid.run_overrides(sampled, 0, 1, args, [])  # zoo 0: the folders from before
    assert "run.name=reference-z3-s1" in grid.run_overrides(None, 3, 1, args, [])
    names = {o for z in (0, 1, 2) for s in (0, 1) for r in [None, *grid_rows.ROWS]
             for o in grid.run_overrides(r, z, s, args, ["<x>"]) if o.startswith("run.name=")}
    assert len(names) == 3 * 2 * (1 + len(grid_rows.ROWS))
    cfg = grid.load_config(_fake_config(tmp_path), over)  # the framework takes the override: the zoo to resolve
    assert cfg.run.zoo_seed == 3 and grid.RunDir.for_config(cfg).root == tmp_path / "runs" / "sampled-z3-s1"
    assert (grid.run_key(0, 2), grid.run_key(3, 2)) == ("2", "z3-s2")


def _fake_config(tmp_path: Path) -> Path:
    path = tmp_path / "fake.yaml"  # model folders that do not exist: load_config does not look, preflight would
    path.write_text(yaml.safe_dump(tiny_run_data(tmp_path / "unused", {"student": tmp_path / "s",
                                                                       "teacher": tmp_path / "t"}, "fake", 2)))
    return path


def test_two_zoos_pool_runs_and_pair_them_by_zoo_and_seed(tmp_path, monkeypatch):
    success = {("sampled", 0, 0): 0.2, ("sampled", 0, 1): 0.3, ("sampled", 1, 0): 0.4, ("sampled", 1, 1): 0.5,
               ("topk", 0, 0): 0.3, ("topk", 0, 1): 0.3, ("topk", 1, 0): 0.5, ("topk", 1, 1): 0.7}
    calls = []

    def fake_run_one(config_path, overrides, *, reference, retry_failed):
        over = dict(o.split("=", 1) for o in overrides)
        calls.append(over)
        root = Path(over["run.output_dir"]) / over["run.name"]
        root.mkdir(parents=True)
        key = (over["run.name"].split("-")[0], int(over["run.zoo_seed"]), int(over["run.seed"]))
        (root / "eval.json").write_text(json.dumps({"final": {"math": {"episodes": 10.0, "success": success[key]}}}))
        return {"dir": str(root), "status": "done"}

    monkeypatch.setattr(grid, "run_one", fake_run_one)
    out = tmp_path / "grid"
    argv = ["--config", str(_fake_config(tmp_path)), "--zoos", "0", "1", "--seeds", "0", "1", "--rows",
            "sampled,topk", "--out", str(out)]
    assert grid.main(argv) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "sampled-s0", "sampled-s1", "sampled-z1-s0", "sampled-z1-s1", "topk-s0", "topk-s1", "topk-z1-s0", "topk-z1-s1"]
    assert [c["run.zoo_seed"] for c in calls] == ["0"] * 4 + ["1"] * 4
    data = _results(out)
    assert data["zoos"] == [0, 1] and isinstance(data["wall_seconds"], float) and data["wall_seconds"] >= 0
    assert list(data["runs"]["topk"]) == ["0", "1", "z1-s0", "z1-s1"]
    assert data["runs"]["topk"]["z1-s1"]["zoo_seed"] == 1 and data["runs"]["topk"]["z1-s1"]["seed"] == 1
    zoo0, zoo1 = (data["per_zoo"][z]["sampled"]["success"]["math/success"] for z in ("0", "1"))
    assert (zoo0["mean"], zoo1["mean"]) == (pytest.approx(0.25), pytest.approx(0.45))
    pooled = data["rows"]["sampled"]["success"]["math/success"]  # 20, 30, 40, 50: sample std 12.91, SE 6.455
    assert pooled["values"] == [0.2, 0.3, 0.4, 0.5] and pooled["mean"] == pytest.approx(0.35)
    assert pooled["se"] == pytest.approx(math.sqrt(0.05 / 3) / 2)
    # topk − sampled per (zoo, seed): 10, 0, 10, 20 points: mean 10, sample std sqrt(200/3), SE 4.082, t = √6, df 3
    test = data["rows"]["topk"]["vs_sampled"]["math/success"]
    assert test["n"] == 4 and test["diff"] == pytest.approx(0.1) and test["t"] == pytest.approx(math.sqrt(6))
    p3 = 1 - 2 / math.pi * (math.atan(math.sqrt(2)) + math.sqrt(2) / 3)  # df 3 closed form at t/√3 = √2: 0.0917
    assert test["p"] == pytest.approx(p3)
    z0, z1 = (data["per_zoo"][z]["topk"]["vs_sampled"]["math/success"] for z in ("0", "1"))
    assert z0["n"] == 2 and z0["t"] == pytest.approx(1.0) and z0["p"] == pytest.approx(0.5)  # 10, 0: t 1, df 1
    assert z1["diff"] == pytest.approx(0.15) and z1["p"] == pytest.approx(1 - 2 / math.pi * math.atan(3.0))
    md = (out / "results.md").read_text()
    assert "## Zoo build seed 0" in md and "## Zoo build seed 1" in md
    assert "## Pooled over zoos [0, 1]: math success %" in md
    assert "| sampled-token OPD (`sampled`) | 4/4 | 25.0 | 45.0 | 35.0 ± 6.5 (20.0 / 30.0 / 40.0 / 50.0) |  |" in md
    # topk pooled: 30, 30, 50, 70: mean 45, deviations -15, -15, 5, 25: sample var 1100 / 3, SE sqrt(1100 / 12) = 9.57
    assert data["rows"]["topk"]["success"]["math/success"]["se"] == pytest.approx(math.sqrt(0.11 / 12))
    assert f"| 30.0 | 60.0 | 45.0 ± 9.6 (30.0 / 30.0 / 50.0 / 70.0) | +10.0 ± 4.1, p = {p3:.3f} (4 pairs) |" in md


# ---- wall time over several invocations into one --out (no training) ---------------------------------------------

@pytest.mark.parametrize(("previous", "before"), [
    ({"wall_seconds": 30.0, "wall_seconds_total": 100.0}, 100.0),  # the running total, not the last invocation's
    ({"wall_seconds": 42.5}, 42.5),  # written before `wall_seconds_total`: its own wall time is the total so far
    ({"wall_seconds": 20.0, "wall_seconds_total": None}, 20.0),  # re-rendered from such a grid
    ({"wall_seconds": None, "wall_seconds_total": None}, 0.0),  # re-rendered from a grid that recorded neither
    ({"wall_seconds_total": 7}, 7.0),
    ({"wall_seconds_total": "100", "wall_seconds": True}, 0.0),  # not numbers
    ({"wall_seconds_total": float("nan")}, 0.0),  # json writes NaN, and reads it back
    ([1, 2], 0.0),  # JSON, but no grid's header
])
def test_total_wall_seconds_adds_this_invocation_to_the_previous_total(tmp_path, previous, before):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(previous))
    assert grid.total_wall_seconds(path, 12.3) == pytest.approx(before + 12.3)


def test_total_wall_seconds_without_a_readable_previous_grid_is_this_invocations(tmp_path):
    assert grid.total_wall_seconds(tmp_path / "missing.json", 12.3) == 12.3
    (tmp_path / "truncated.json").write_text('{"wall_seconds_total": 10')
    assert grid.total_wall_seconds(tmp_path / "truncated.json", 12.3) == 12.3
    (tmp_path / "binary.json").write_bytes(b"\x80\x04\x95 not text")  # e.g. a pickle: not decoded, never loaded
    assert grid.total_wall_seconds(tmp_path / "binary.json", 12.3) == 12.3
    (tmp_path / "nested.json").write_text("[" * 100_000)
    assert grid.total_wall_seconds(tmp_path / "nested.json", 12.3) == 12.3
    (tmp_path / "folder.json").mkdir()
    assert grid.total_wall_seconds(tmp_path / "folder.json", 12.3) == 12.3
    assert grid.total_wall_seconds(tmp_path / "missing.json", 0.04) == 0.0  # rounded to 0.1 s like `wall_seconds`


def test_wall_time_accumulates_over_invocations_and_rerender_keeps_it(tmp_path, monkeypatch):
    def fake_run_one(config_path, overrides, *, reference, retry_failed):
        over = dict(o.split("=", 1) for o in overrides)
        root = Path(over["run.output_dir"]) / over["run.name"]
        root.mkdir(parents=True, exist_ok=True)
        (root / "eval.json").write_text(json.dumps({"final": {"math": {"episodes": 10.0, "success": 0.5}}}))
        return {"dir": str(root), "status": "done"}

    monkeypatch.setattr(grid, "run_one", fake_run_one)
    out = tmp_path / "grid"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config": "c.yaml", "wall_seconds": 600.0}))  # before the field
    argv = ["--config", str(_fake_config(tmp_path)), "--seeds", "0", "--rows", "sampled", "--out", str(out)]
    assert grid.main(argv) == 0
    first = _results(out)
    assert first["wall_seconds_total"] == round(600.0 + first["wall_seconds"], 1)
    assert grid.main(argv) == 0
    second = _results(out)
    assert second["wall_seconds_total"] == round(first["wall_seconds_total"] + second["wall_seconds"], 1)
    assert second["wall_seconds_total"] >= 600.0 + second["wall_seconds"]
    md = (out / "results.md").read_text()
    assert (f"grid wall time {second['wall_seconds'] / 60:.1f} min this invocation, "
            f"{second['wall_seconds_total'] / 60:.1f} min over all invocations into this folder.") in md
    assert grid.main(["--rerender", str(out)]) == 0  # no invocation of the grid: both wall times kept as stored
    rerendered = _results(out)
    assert {k: rerendered[k] for k in ("wall_seconds", "wall_seconds_total")} == {
        k: second[k] for k in ("wall_seconds", "wall_seconds_total")}


def test_markdown_wall_time_shows_the_total_over_invocations_when_recorded():
    header = {"config": "c.yaml", "zoos": [0], "seeds": [0], "set": [], "special_tokens": []}
    cases = [({"wall_seconds": 90.0, "wall_seconds_total": 720.0},
              "grid wall time 1.5 min this invocation, 12.0 min over all invocations into this folder."),
             ({"wall_seconds": 90.0}, "grid wall time 1.5 min."),  # a grid from before `wall_seconds_total`
             ({"wall_seconds": None, "wall_seconds_total": None}, "grid wall time not recorded.")]
    for wall, line in cases:
        markdown = grid_report.to_markdown({0: {}}, {}, header | wall, grid_rows.GROUPS, grid_rows.DIAGNOSTICS)
        assert line in markdown, wall


# ---- --rerender: a stored grid's results.json from before the statistics change (no training) --------------------

def _old_run(math: float, trained: bool = True) -> dict:
    """A run record as the grid wrote it before --zoos: no zoo_seed or seed (the key is the seed)."""
    run = {"dir": "/tmp/grid/runs/x", "seconds": 12.5, "status": "done",
           "eval": {"math": {"episodes": 400.0, "success": math}}}
    return run | ({"diagnostics": {"train/grad_norm": 2 * math}, "curves": {"train/grad_norm": [[1, 1.0], [2, 0.5]]}}
                  if trained else {})


def _old_grid() -> dict:
    success = {"student": (0.29, 0.29, 0.29), "sampled": (0.30, 0.40, 0.50), "topk_mask": (),
               "topk": (0.35, 0.50, 0.55), "legacy_row": (0.20, 0.30, 0.45)}
    runs = {name: {str(s): _old_run(v, name != "student") for s, v in enumerate(values)}
            for name, values in success.items() if values}
    rows = {name: {"label": f"stored label of {name}", "group": "ablation" if name == "legacy_row" else "main",
                   "seeds_done": len(values), "seeds": len(values),
                   "success": {"math/success": [0.123, 0.456]} if values else {},  # stale: recomputed, not kept
                   "diagnostics": {}, "notes": [] if values else ["not run: no special tokens to mask"]}
            for name, values in success.items()}
    return {"config": "configs/math.yaml", "seeds": [0, 1, 2], "set": ["optim.lr=1e-4"], "steps": None,
            "special_tokens": [], "rows": rows, "runs": runs}


def test_rerender_reaggregates_a_stored_old_format_grid(tmp_path, capsys, monkeypatch):
    old = _old_grid()
    (tmp_path / "results.json").write_text(json.dumps(old, indent=1))
    (tmp_path / "results.md").write_text("mean ± std")
    (tmp_path / "notes.txt").write_text("kept")
    def no_runs(*args, **kwargs):
        raise AssertionError("--rerender ran something")

    for name in ("run_one", "load_config", "Trainer"):  # no run, no config, no Ray: the stored records alone
        monkeypatch.setattr(grid, name, no_runs)
    monkeypatch.setattr(grid.ray, "init", no_runs)
    assert grid.main(["--rerender", str(tmp_path)]) == 0
    data = _results(tmp_path)
    # The header as stored, zoos inferred, no wall time recorded, the re-rendering noted; rows in the stored order.
    assert {k: data[k] for k in ("config", "seeds", "set", "steps", "special_tokens")} == {
        k: old[k] for k in ("config", "seeds", "set", "steps", "special_tokens")}
    assert data["zoos"] == [0] and data["wall_seconds"] is None and "--rerender" in data["rerendered"]
    assert data["wall_seconds_total"] is None  # unknown, not made up
    assert list(data["rows"]) == ["student", "sampled", "topk_mask", "topk", "legacy_row"]
    assert list(data["per_zoo"]) == ["0"] and data["per_zoo"]["0"] == data["rows"]
    # Every run record kept, with its zoo (0) and seed (its key) added in front.
    for name, records in old["runs"].items():
        assert list(data["runs"][name]) == ["0", "1", "2"]
        for key, record in records.items():
            assert data["runs"][name][key] == {"zoo_seed": 0, "seed": int(key)} | record
    rows = data["rows"]
    # Rows of ROWS take their label from there; a row no longer in ROWS keeps its stored label and group.
    assert rows["topk"]["label"] == grid_rows.select_rows("topk")[0].label
    assert rows["legacy_row"]["label"] == "stored label of legacy_row" and rows["legacy_row"]["group"] == "ablation"
    assert rows["topk_mask"]["notes"] == ["not run: no special tokens to mask"] and rows["topk_mask"]["seeds"] == 0
    # topk 35, 50, 55: mean 46.67, sample var 0.065 / 6 (as fractions), SE sqrt(0.065 / 18) = 6.0 points
    topk = rows["topk"]["success"]["math/success"]
    assert topk["values"] == [0.35, 0.50, 0.55] and topk["runs"] == ["0", "1", "2"]
    assert topk["mean"] == pytest.approx(1.4 / 3) and topk["se"] == pytest.approx(math.sqrt(0.065 / 18))
    assert rows["topk"]["diagnostics"]["train/grad_norm"]["values"] == [0.7, 1.0, 1.1]
    # topk − sampled: 5, 10, 5 points: t = 4 with df 2
    vs = rows["topk"]["vs_sampled"]["math/success"]
    assert vs["n"] == 3 and vs["diff"] == pytest.approx(0.2 / 3) and vs["p"] == pytest.approx(1 - 4 / math.sqrt(18))
    assert rows["student"]["vs_sampled"] == {} and rows["sampled"]["vs_sampled"] == {}
    # legacy_row (a stored ablation row, trained: it has diagnostics) − topk: −15, −20, −10: t = −3√3, df 2
    within = rows["legacy_row"]["vs_rows"]["topk"]["math/success"]
    assert within["diff"] == pytest.approx(-0.15) and within["se"] == pytest.approx(0.05 / math.sqrt(3))
    assert within["p"] == pytest.approx(1 - 3 * math.sqrt(3) / math.sqrt(29))
    assert rows["legacy_row"]["vs_sampled"]["math/success"]["n"] == 3 and rows["topk"]["vs_rows"] == {}
    md = (tmp_path / "results.md").read_text()
    assert "± is one standard error of the mean" in md and "grid wall time not recorded" in md
    assert "mean ± std" not in md
    assert "| 3/3 | 46.7 ± 6.0 (35.0 / 50.0 / 55.0) |" in md
    assert f"+6.7 ± 1.7, p = {1 - 4 / math.sqrt(18):.3f} (3 pairs)" in md
    assert (f"| stored label of legacy_row (`legacy_row`) | `topk` | -15.0 ± 2.9, "
            f"p = {1 - 3 * math.sqrt(3) / math.sqrt(29):.3f} (3 pairs) |") in md
    assert "not run: no special tokens to mask" in md
    assert (tmp_path / "plots" / "success.png").is_file() and (tmp_path / "plots" / "curves.png").is_file()
    assert (tmp_path / "notes.txt").read_text() == "kept"
    # Re-rendering a re-rendered grid changes nothing.
    before = (tmp_path / "results.json").read_text(), md
    assert grid.main(["--rerender", str(tmp_path)]) == 0
    assert ((tmp_path / "results.json").read_text(), (tmp_path / "results.md").read_text()) == before
    capsys.readouterr()
    assert grid.main(["--rerender", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ---- --merge: grids of one config run on different zoos (machines, days) pooled as one -----------------------------

def _zoo_grid(zoo: int, success: dict[str, tuple[float, ...]], **header) -> dict:
    """A stored grid of one zoo's runs, as `experiments.grid` writes it (keys `<seed>` on zoo 0, `z<zoo>-s<seed>`)."""
    def key(seed: int) -> str:
        return str(seed) if zoo == 0 else f"z{zoo}-s{seed}"

    runs = {name: {key(s): {"zoo_seed": zoo, "seed": s, "commit": f"c{zoo}"} | _old_run(v, name != "student")
                   for s, v in enumerate(values)} for name, values in success.items()}
    rows = {name: {"label": name, "group": "main", "notes": []} for name in success}
    return {"config": "configs/alternating.yaml", "code": {"commit": f"c{zoo}", "dirty": False}, "zoos": [zoo],
            "seeds": [0, 1, 2], "set": [], "steps": None, "special_tokens": [], "wall_seconds": 60.0 * (zoo + 1),
            "wall_seconds_total": 100.0 * (zoo + 1), "rows": rows, "runs": runs} | header


def _write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data, indent=1))
    return folder


ZOO0 = {"student": (0.29, 0.29, 0.29), "sampled": (0.30, 0.40, 0.50), "topk": (0.35, 0.50, 0.55)}
ZOO1 = {"student": (0.31, 0.31, 0.31), "sampled": (0.33, 0.38, 0.41), "topk": (0.40, 0.41, 0.52)}


def test_merge_pools_two_zoos_grids_as_one_grid_of_all_their_runs(tmp_path, capsys):
    a, b = _write(tmp_path / "z0", _zoo_grid(0, ZOO0)), _write(tmp_path / "z1", _zoo_grid(1, ZOO1))
    # The reference: one stored grid holding every run, re-rendered.
    both = _zoo_grid(0, ZOO0)
    for name, records in _zoo_grid(1, ZOO1)["runs"].items():
        both["runs"][name] |= records
    both["zoos"] = [0, 1]
    ref = _write(tmp_path / "ref", both)
    assert grid.main(["--rerender", str(ref)]) == 0
    out = tmp_path / "merged"
    assert grid.main(["--merge", str(a), str(b), "--out", str(out)]) == 0
    merged, expected = _results(out), _results(ref)
    assert merged["rows"] == expected["rows"] and merged["per_zoo"] == expected["per_zoo"]
    assert merged["runs"] == expected["runs"]  # every run record as stored, its own commit kept
    assert merged["zoos"] == [0, 1] and merged["seeds"] == [0, 1, 2]
    assert merged["wall_seconds"] is None and merged["wall_seconds_total"] == 300.0
    assert [(m["dir"].endswith("z0"), m["code"]["commit"], m["zoos"]) for m in merged["merged_from"]] == [
        (True, "c0", [0]), (False, "c1", [1])]
    # 6 (zoo, seed) pairs in the pooled paired test of topk against sampled.
    assert merged["rows"]["topk"]["vs_sampled"]["math/success"]["n"] == 6
    assert "Merged from 2 grids" in (out / "results.md").read_text()
    assert (out / "plots" / "success.png").is_file()


def test_merge_refuses_grids_it_cannot_pool_and_writes_nothing(tmp_path, capsys):
    a = _write(tmp_path / "z0", _zoo_grid(0, ZOO0))
    other_lr = _write(tmp_path / "lr", _zoo_grid(1, ZOO1, set=["optim.lr=1e-3"]))
    again = _write(tmp_path / "again", _zoo_grid(0, {"topk": (0.9,)}))
    foreign = _write(tmp_path / "foreign", _zoo_grid(2, ZOO1))
    b = _write(tmp_path / "z1", _zoo_grid(1, ZOO1))
    renamed = _zoo_grid(1, ZOO1)
    renamed["runs"]["topk"]["z0-s1"] = renamed["runs"]["topk"].pop("z1-s1")  # zoo 1's run under a zoo-0 key
    renamed = _write(tmp_path / "renamed", renamed)
    cases = [([a, other_lr], tmp_path / "o1", "differ in 'set'"),
             ([a, again], tmp_path / "o2", "run topk/0 is in two of the grids"),
             ([a, b], foreign, "already holds a results.json"),
             ([a, b], b, "is one of the grids merged"),
             ([a, renamed], tmp_path / "o4", "run topk/z0-s1 says zoo 1, seed 1, whose key is z1-s1"),
             ([a, tmp_path / "missing"], tmp_path / "o3", "is not a folder")]
    for sources, out, message in cases:
        before = {f: (f / "results.json").read_text() for f in (foreign, b)}
        assert grid.main(["--merge", *map(str, sources), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert out in before and (out / "results.json").read_text() == before[out] or not out.exists()
    with pytest.raises(SystemExit) as exit_code:  # no --out: no silent default folder
        grid.main(["--merge", str(a), str(b)])
    assert exit_code.value.code == 2 and "--merge needs --out" in capsys.readouterr().err


def test_merge_sums_the_wall_time_of_grids_from_before_the_total_was_recorded(tmp_path):
    old = _zoo_grid(0, ZOO0, wall_seconds=90.0, wall_seconds_total=None)  # a re-rendered older grid
    a, b = _write(tmp_path / "z0", old), _write(tmp_path / "z1", _zoo_grid(1, ZOO1, seeds=None))
    assert grid.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = _results(tmp_path / "m")
    assert merged["wall_seconds_total"] == 90.0 + 200.0 and merged["seeds"] == [0, 1, 2]


def test_every_row_is_a_valid_main_job_config_and_the_staleness_rows_pair_with_topk_and_each_other():
    from opd_agents.config import load_config
    from opd_agents.run.preflight import loss_spec

    for row in grid_rows.ROWS:
        masked = ["loss.special_tokens=[<|im_end|>]"] if row.masked else []
        cfg = load_config(Path("configs/alternating.yaml"), [*row.overrides, *masked])
        loss_spec(cfg)  # the static checks preflight makes (e.g. async with a student top-K support is refused)
    stale = grid_rows.select_rows("topk,staleness")
    assert [grid_rows.within_baselines(r, stale) for r in stale] == [
        [], ["topk"], ["topk", "topk_async2"], ["topk", "topk_async2", "topk_async2_is"]]
    corrected = load_config(Path("configs/alternating.yaml"), list(stale[2].overrides))
    assert (corrected.run.pipeline, corrected.run.max_staleness, corrected.loss.off_policy_correction) == (
        "async", 2, "truncate")
