"""The main job on several independently built zoos: `python -m experiments.main_job [options]`.

    python -m experiments.main_job [--config configs/alternating.yaml] [--zoos 0 1] [--seeds 0 1 2]
                                   [--out runs/main_job] [--results experiments/results/main_job] [--min-gain 5]

Each (zoo seed, run seed) is the command a user runs, as a subprocess —
`python -m opd_agents.train CONFIG run.zoo_seed=Z run.seed=S run.output_dir=OUT run.name=z<Z>-s<S>` — so the first
run on a zoo seed builds that zoo (on a fresh `$OPD_AGENTS_CACHE`) and its wall time includes the build, as a
newcomer's first run does. A finished run (its `eval.json` has a verdict) is not rerun.

Writes, under `--results`: `summary.json` (the machine and library versions; per zoo its manifest: the models'
steps, held-out success, weights' sha256, build seconds; per run its wall seconds, whether it built the zoo, its
`eval.json` with the verdict, and a metrics summary: each task's loss over the first and last 5 of its steps) and
`summary.md` (per run before -> after ± standard error for every task, the gain with its paired standard error,
and whether it clears `--min-gain` points). Exit code 1 when a run failed or missed the target.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from envs.user_files import MIB
from experiments.grid_aggregate import stored_json
from opd_agents.config import load_config
from opd_agents.run.metrics import read_metrics
from opd_agents.run.provenance import code_version, config_sha256, portable_path
from opd_agents.run.rundir import atomic_write_json, atomic_write_text

STORED_MAX_BYTES = 64 * MIB  # a run's eval.json, run record or zoo manifest


def zoo_folder(zoo_seed: int) -> Path:
    from opd_agents.zoo.resolve import zoo_dir

    return zoo_dir(build_seed=zoo_seed)


RUN_RECORD = "main_job_run.json"  # in each run folder: the invocation that trained it (commit, wall time)


def run_main_job(config: Path, zoo_seed: int, seed: int, out: Path, timeout_s: float) -> dict[str, Any]:
    """One main job as a subprocess; its wall time, whether it built its zoo, its exit status and the commit it ran
    at (kept in the run folder's `main_job_run.json`, so a finished run that is reused reports its own)."""
    from opd_agents.zoo.paths import is_complete

    name = f"z{zoo_seed}-s{seed}"
    run_dir = out / name
    evaluation = run_dir / "eval.json"
    if evaluation.is_file() and "verdict" in stored_json(evaluation, "run evaluation", STORED_MAX_BYTES):
        record = run_dir / RUN_RECORD
        stored = stored_json(record, "main-job run record", STORED_MAX_BYTES) if record.is_file() else {}
        return stored | {"name": name, "dir": portable_path(run_dir), "status": "done", "reused": True}
    built = not is_complete(zoo_folder(zoo_seed))
    command = [sys.executable, "-m", "opd_agents.train", str(config), f"run.zoo_seed={zoo_seed}", f"run.seed={seed}",
               f"run.output_dir={out}", f"run.name={name}"]
    if run_dir.exists():
        command.append("--resume")
    started = time.perf_counter()
    print("$ " + " ".join(command), flush=True)
    try:
        code = subprocess.run(command, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    record = {"wall_seconds": round(time.perf_counter() - started, 1), "built_zoo": built, **code_version()}
    if code == 0:
        atomic_write_json(run_dir / RUN_RECORD, record)
    return record | {"name": name, "dir": portable_path(run_dir), "status": "done" if code == 0 else f"failed ({code})",
                     "reused": False}


def run_config_sha256(run_dir: Path) -> str | None:
    """The config hash (`provenance.config_sha256`) of the config a run saved, or None without one."""
    path = run_dir / "config.yaml"
    return config_sha256(load_config(path)) if path.is_file() else None


def loss_summary(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task: its loss averaged over the first and the last 5 of its training steps."""
    out = {}
    for task in tasks:
        losses = [r[f"{task}/train/loss"] for r in records if f"{task}/train/loss" in r]
        if losses:
            out[task] = {"steps": len(losses), "loss_first5": sum(losses[:5]) / len(losses[:5]),
                         "loss_last5": sum(losses[-5:]) / len(losses[-5:])}
    return out


def fidelity_summary(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """The signal-fidelity probes of a run: how many, and their cosine's mean, min and last; None without any."""
    cosines = [r["fidelity/cosine"] for r in records if isinstance(r.get("fidelity/cosine"), (int, float))]
    if not cosines:
        return None
    return {"probes": len(cosines), "cosine_mean": sum(cosines) / len(cosines), "cosine_min": min(cosines),
            "cosine_last": cosines[-1]}


def machine() -> dict[str, Any]:
    from opd_agents.zoo.build import machine as build_machine

    argv = [portable_path(a) if os.path.isabs(a) else a for a in sys.argv[1:]]  # no machine path in the record
    return build_machine(None) | {"load_average": os.getloadavg(), "argv": argv}


def zoo_summary(zoo_seed: int) -> dict[str, Any]:
    manifest_path = zoo_folder(zoo_seed) / "zoo_manifest.json"
    if not manifest_path.is_file():
        return {"folder": portable_path(zoo_folder(zoo_seed)), "complete": False}
    manifest = stored_json(manifest_path, "zoo manifest", STORED_MAX_BYTES)
    keep = ("steps", "budget_bound", "train_seconds", "eval_success", "weights_sha256", "selection")
    return {"folder": portable_path(zoo_folder(zoo_seed)), "build_version": manifest["build_version"],
            "build_seed": manifest.get("build_seed", 0), "build_seconds": manifest["build_seconds"],
            "machine": manifest.get("machine"), "eval": manifest["eval"],
            "models": {name: {k: e.get(k) for k in keep} for name, e in manifest["models"].items()}}


def meets(gain: float, min_gain: float) -> bool:
    """A gain (a fraction) reaches `min_gain` points; rounded to 1e-9 points first, so 0.3 - 0.2 counts as 10."""
    return round(100 * gain, 9) >= min_gain


def code_line(summary: dict[str, Any]) -> str:
    """The commit the summary was written at, and each run's own where it differs."""
    def name(code: dict[str, Any]) -> str:
        commit = code.get("commit")
        if not commit:
            return "an unknown commit"
        return commit[:12] + (" (with local changes)" if code.get("dirty") else "")

    here = name(summary.get("code", {}))
    others = sorted({name(r) for r in summary["runs"] if "commit" in r} - {here})
    return f"Code: {here}" + (f"; some runs trained at {', '.join(others)}." if others else ".")


def to_markdown(summary: dict[str, Any], min_gain: float) -> str:
    tasks = summary["tasks"]
    lines = [f"# The main job on {len(summary['zoos'])} zoos × {len(summary['seeds'])} seeds", "",
             f"Config `{summary['config']}`; command per run `python -m opd_agents.train {summary['config']} "
             "run.zoo_seed=Z run.seed=S`. Success on the whole eval split in %, ± one binomial standard error; gain "
             "in points ± its paired standard error (same eval items before and after); ✓ = gain ≥ "
             f"{min_gain:g} points. Wall time includes the zoo build where the run built it. {code_line(summary)}", "",
             "| zoo | seed | " + " | ".join(f"{t} before → after | {t} gain" for t in tasks) + " | wall s | |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in tasks) + " | --- | --- |"]
    for run in summary["runs"]:
        cells = []
        verdicts = run.get("eval", {}).get("verdict", {})
        for task in tasks:
            v = verdicts.get(task)
            if v is None:
                cells += ["–", "–"]
                continue
            se = "" if v["gain_se"] is None else f" ± {100 * v['gain_se']:.1f}"
            mark = " ✓" if meets(v["gain"], min_gain) else " ✗"
            cells += [f"{100 * v['before']:.1f} ± {100 * v['before_se']:.1f} → {100 * v['after']:.1f} ± "
                      f"{100 * v['after_se']:.1f}", f"{100 * v['gain']:+.1f}{se}{mark}"]
        wall = run.get("wall_seconds", "–")
        built = " (incl. build)" if run.get("built_zoo") else ""
        lines.append(f"| {run['zoo_seed']} | {run['seed']} | " + " | ".join(cells) + f" | {wall}{built} | "
                     f"{run['status']} |")
    models = list(dict.fromkeys(name for zoo in summary["zoos"] for name in zoo.get("models", {})))
    lines += ["", "Zoos (held-out success in the build's own scoring, %):", "",
              "| zoo | build s | " + " | ".join(models) + " |",
              "| --- | --- | " + " | ".join("---" for _ in models) + " |"]
    for zoo in summary["zoos"]:
        if not zoo.get("complete", True):  # zoo_summary of a zoo that was never built
            lines.append(f"| {zoo['folder']} | not built | " + " | ".join("–" for _ in models) + " |")
            continue
        scores = [" / ".join(f"{100 * s:.1f}" for s in zoo["models"][m]["eval_success"].values())
                  if m in zoo["models"] else "–" for m in models]
        lines.append(f"| {zoo['build_seed']} | {zoo['build_seconds']} | " + " | ".join(scores) + " |")
    return "\n".join(lines) + "\n"


def exit_code(runs: list[dict[str, Any]], tasks: list[str], min_gain: float) -> int:
    """0 when every run is done and has a verdict on every task with a gain of at least `min_gain` points, else 1."""
    def met(run: dict[str, Any]) -> bool:
        verdicts = run.get("eval", {}).get("verdict", {})
        return run["status"] == "done" and all(t in verdicts and meets(verdicts[t]["gain"], min_gain) for t in tasks)

    return 0 if all(met(r) for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.main_job", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/alternating.yaml"))
    parser.add_argument("--zoos", type=int, nargs="+", default=[0, 1], help="zoo build seeds (run.zoo_seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (run.seed)")
    parser.add_argument("--out", type=Path, default=Path("runs/main_job"), help="parent folder of the run dirs")
    parser.add_argument("--results", type=Path, default=Path("experiments/results/main_job"))
    parser.add_argument("--min-gain", type=float, default=5.0, help="target gain per task, in points")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is stopped")
    args = parser.parse_args(argv)
    tasks = [t.name for t in load_config(args.config).tasks]
    runs = []
    for zoo_seed in args.zoos:
        for seed in args.seeds:
            run = run_main_job(args.config, zoo_seed, seed, args.out, args.timeout) | {"zoo_seed": zoo_seed,
                                                                                         "seed": seed}
            root = args.out / run["name"]
            run["config_sha256"] = run_config_sha256(root)
            if (root / "eval.json").is_file():
                run["eval"] = stored_json(root / "eval.json", "run evaluation", STORED_MAX_BYTES)
            records = read_metrics(root / "metrics.jsonl")
            run["losses"] = loss_summary(records, tasks)
            run["fidelity"] = fidelity_summary(records)
            runs.append(run)
    summary = {"config": portable_path(args.config), "zoos": [zoo_summary(z) for z in args.zoos], "seeds": args.seeds,
               "tasks": tasks, "min_gain_points": args.min_gain, "machine": machine(),
               "python": platform.python_version(), "code": code_version(), "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "summary.json", summary)
    table = to_markdown(summary, args.min_gain)
    atomic_write_text(args.results / "summary.md", table)
    print(table)
    return exit_code(runs, tasks, args.min_gain)


if __name__ == "__main__":
    sys.exit(main())
