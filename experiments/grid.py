"""The paper's comparison grid in miniature: `python -m experiments.grid [options]`.

    python -m experiments.grid [--config configs/alternating.yaml] [--seeds 0 1 2] [--rows all|NAME,...]
                               [--out runs/grid] [--steps N] [--set key=value ...] [--special-tokens TOK ...]

Each row is a set of config overrides (`ROWS`; `--list` prints them); each (row, seed) is one run through the
framework's own path — `load_config` with dotted overrides, `preflight`, `RunDir`, `Trainer.fit` — into its own run
directory `<out>/runs/<row>-s<seed>/`. The `student` (before training) and `teacher` rows come from one reference
run per seed (`reference-s<seed>`: the student evaluated once, then each task's teacher played as a policy), so
training runs skip both (`run.eval_before=false`, `eval.teacher_reference=false`).

Override order per run: the config file, then `--set` and `--steps`, then the row's own keys (rows fully specify
`loss.name/k/support/renormalize/special_tokens` and `rollout.top_p`), then seed, name and output folder.

Resume-friendly: a run whose `grid_status.json` says done is skipped (its config must be unchanged), a failed one
is skipped unless `--retry-failed`, and an interrupted one resumes from its last checkpoint (or restarts if it had
none). A run that fails is recorded — status, error and traceback in `grid_error.txt` — and the grid goes on.

Writes `<out>/results.json` (every run's status, eval summary and diagnostics, plus per-row aggregates),
`<out>/results.md` (tables like the paper's Tables 1–4: success per task and task type, mean ± std over seeds;
training-stability diagnostics over the last 25% of steps) and `<out>/plots/{success,curves}.png`.
Rows a config cannot support are explained in the table, not dropped: the `*_mask` rows without special tokens
to mask, and any run whose config `load_config`/`preflight` reject (status `invalid`, with the message).
Exit code 1 when some run failed (all still reported), else 0.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from experiments.grid_report import plot, to_markdown
from opd_agents.config import Config, ConfigError, dump_config, load_config
from opd_agents.run.checkpoint import latest_checkpoint
from opd_agents.run.evaluation import Evaluator
from opd_agents.run.metrics import read_metrics
from opd_agents.run.preflight import preflight
from opd_agents.run.rundir import RunDir, atomic_write_json, atomic_write_text
from opd_agents.run.trainer import Trainer, seed_everything


def _row_keys(name: str = "topk_reverse_kl", k: int = 32, support: str = "teacher_topk", renormalize: bool = True,
              top_p: float = 0.9) -> tuple[str, ...]:
    return (f"loss.name={name}", f"loss.k={k}", f"loss.support={support}",
            f"loss.renormalize={str(renormalize).lower()}", f"rollout.top_p={top_p}")


@dataclass(frozen=True)
class Row:
    name: str  # id for --rows and the run folder
    label: str  # the table's row label
    group: str  # which table: main | ablation | support
    overrides: tuple[str, ...] = ()
    masked: bool = False  # adds loss.special_tokens (needs --special-tokens or the config's loss.special_tokens)
    reference: bool = False  # read from the reference run instead of a training run


ROWS: tuple[Row, ...] = (
    Row("student", "student (before training)", "main", reference=True),
    Row("sampled", "sampled-token OPD", "main", _row_keys("sampled_token_opd")),
    Row("sampled_mask", "sampled-token OPD + special-token mask", "main", _row_keys("sampled_token_opd"), True),
    Row("topk", "top-K truncated reverse-KL (K=32, teacher top-K, renorm., top-p 0.9)", "main", _row_keys()),
    Row("topk_mask", "top-K truncated reverse-KL + special-token mask", "main", _row_keys(), True),
    Row("teacher", "teacher (reference)", "main", reference=True),
    Row("no_renorm", "top-K, no renormalisation", "ablation", _row_keys(renormalize=False)),
    Row("top_p_1", "top-K, top-p 1.0 rollouts", "ablation", _row_keys(top_p=1.0)),
    *(Row(f"k{k}", f"top-K, K={k}", "ablation", _row_keys(k=k)) for k in (1, 2, 4, 8, 16)),
    Row("student_topk", "support: student top-K", "support", _row_keys(support="student_topk")),
    Row("union", "support: teacher top-K ∪ sampled token", "support",
        _row_keys(support="teacher_topk_union_sampled")),
)
GROUPS = {"main": "Main comparison (paper Tables 1–2)",
          "ablation": "Ablations (paper Table 3; K=32 / top-p 0.9 / renormalised is the `topk` row)",
          "support": "Support variants (paper Table 4; teacher top-K is the `topk` row)"}
DIAGNOSTICS = {"grad norm": "train/grad_norm", "clip fraction": "train/clip_fraction", "entropy": "train/entropy",
               "teacher−student gap": "train/gap_mean", "sampled ∉ support": "train/sampled_not_in_support",
               "skipped updates": "train/skipped"}
TAIL = 0.25  # diagnostics: mean over the last quarter of training steps
STATUS_FILE = "grid_status.json"


def select_rows(spec: str) -> list[Row]:
    """`all`, or comma-separated row names and group names (main, ablation, support), in table order."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    names = {r.name for r in ROWS}
    unknown = sorted(wanted - names - set(GROUPS) - {"all"})
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {unknown}; rows: {[r.name for r in ROWS]}, groups: "
                          f"{list(GROUPS)}, or 'all'")
    return [r for r in ROWS if "all" in wanted or r.name in wanted or r.group in wanted]


# ---- running ------------------------------------------------------------------------------------------------------

def run_overrides(row: Row | None, seed: int, args: argparse.Namespace, special: list[str]) -> list[str]:
    """The dotted overrides of one run (`row` None = the reference run)."""
    over = list(args.set)
    if row is not None:
        over += [f"run.steps={args.steps}"] if args.steps is not None else []
        tokens = special if row.masked else []
        over += [*row.overrides, f"loss.special_tokens={json.dumps(tokens)}", "run.eval_before=false",
                 "eval.teacher_reference=false"]
    name = row.name if row is not None else "reference"
    return over + [f"run.seed={seed}", f"run.name={name}-s{seed}", f"run.output_dir={args.out / 'runs'}"]


def _reference_eval(cfg: Config, run_dir: RunDir) -> None:
    """The student evaluated once ("before") and each task's teacher as a policy ("teacher")."""
    from opd_agents.rollout.group import RolloutGroup

    seed_everything(cfg.run.seed)
    evaluator = Evaluator(cfg, run_dir)
    group = RolloutGroup.from_config(cfg)
    try:
        evaluator.run(group, step=0, label="before")
    finally:
        group.shutdown()  # the teacher policies need the student's Ray resources
    if cfg.eval.teacher_reference:
        evaluator.run_teacher_reference()
    evaluator.write_summary()


def run_one(config_path: Path, overrides: list[str], *, reference: bool, retry_failed: bool) -> dict[str, Any]:
    """Run (or skip, or resume) one grid cell; never raises for a run's own failure."""
    t0 = time.perf_counter()
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        return {"status": "invalid", "error": str(exc)}
    run_dir = RunDir.for_config(cfg)
    status_path = run_dir.root / STATUS_FILE
    out: dict[str, Any] = {"dir": str(run_dir.root)}
    if run_dir.config_path.is_file() and run_dir.config_path.read_text() != dump_config(cfg):
        return out | {"status": "failed", "error": f"{run_dir.root} holds a run with a different config; delete it "
                      "or choose another --out"}
    previous = json.loads(status_path.read_text()) if status_path.is_file() else {}
    if previous.get("status") == "done" or (previous.get("status") == "failed" and not retry_failed):
        return out | previous | {"skipped": True}
    try:
        preflight(cfg)
    except ConfigError as exc:
        return out | {"status": "invalid", "error": str(exc)}
    resume = not reference and latest_checkpoint(run_dir.checkpoints_dir) is not None
    if run_dir.root.exists() and not resume:
        shutil.rmtree(run_dir.root)  # an interrupted or failed attempt with nothing worth keeping
    print(f"[grid] {'resuming' if resume else 'running'} {run_dir.root}", flush=True)
    try:
        run_dir.create(cfg, resume=resume)
        if reference:
            _reference_eval(cfg, run_dir)
        else:
            Trainer(cfg, run_dir, resume=resume).fit()
        result = {"status": "done"}
    except Exception as exc:  # a failed run is a result of the grid, not the end of it
        atomic_write_text(run_dir.root / "grid_error.txt", traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(status_path, result)
    return out | result


# ---- collecting ---------------------------------------------------------------------------------------------------

def diagnostics(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, float]:
    """Mean of each diagnostic (and each task's rollout success) over the last TAIL of the steps that logged it."""
    keys = list(DIAGNOSTICS.values()) + [f"{t}/rollout/success_rate" for t in tasks]
    out = {}
    for key in keys:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and r.get("step", 0) > 0]
        if values:
            tail = values[int(len(values) * (1 - TAIL)):] or values[-1:]
            out[key] = sum(tail) / len(tail)
    return out


def collect(run: dict[str, Any], row: Row, tasks: list[str]) -> dict[str, Any]:
    """Attach the run's evaluation (per task: success, type/…), diagnostics and curves to its status record."""
    if "dir" not in run:  # the config was rejected: nothing ran
        return run | {"eval": {}}
    root = Path(run["dir"])
    summary = json.loads((root / "eval.json").read_text()) if (root / "eval.json").is_file() else {}
    label = ("teacher" if row.name == "teacher" else "before") if row.reference else "final"
    run["eval"] = summary.get(label, {}) if run["status"] == "done" else {}
    if row.reference and run["status"] == "done" and not run["eval"]:
        run["note"] = "no teacher evaluation: eval.teacher_reference is false in the config"
    if not row.reference:
        records = read_metrics(root / "metrics.jsonl")
        run["diagnostics"] = diagnostics(records, tasks)
        run["curves"] = curves(records)
    return run


def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    wanted = [k for k in sorted({k for r in records for k in r})
              if (k.startswith("eval/") and k.endswith("/success")) or k.endswith("/rollout/success_rate")
              or k in DIAGNOSTICS.values()]
    return {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in wanted}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[Row], runs: dict[str, dict[int, dict[str, Any]]], why_not: dict[str, str],
              ) -> dict[str, dict[str, Any]]:
    """Per row: success per (task, metric) and diagnostics as [mean, std] over the seeds whose run finished."""
    out = {}
    for row in rows:
        seeds = runs.get(row.name, {})
        done = [r for r in seeds.values() if r["status"] == "done" and r.get("eval")]
        success: dict[str, list[float]] = {}
        for r in done:
            for task, res in r["eval"].items():
                for key, v in res.items():
                    if key != "episodes":
                        success.setdefault(f"{task}/{key}", []).append(v)
        diag: dict[str, list[float]] = {}
        for r in seeds.values():  # a collapsed run's diagnostics are the interesting part: keep failed runs' too
            for key, v in r.get("diagnostics", {}).items():
                diag.setdefault(key, []).append(v)
        notes = [why_not[row.name]] if row.name in why_not else []
        notes += [f"seed {s}: {r['status']}: {r.get('error', '')}".strip(": ") for s, r in seeds.items()
                  if r["status"] != "done"]
        notes += [f"seed {s}: {r['note']}" for s, r in seeds.items() if r.get("note")]
        out[row.name] = {"label": row.label, "group": row.group, "seeds_done": len(done), "seeds": len(seeds),
                         "success": {k: mean_std(v) for k, v in success.items()},
                         "diagnostics": {k: mean_std(v) for k, v in diag.items()}, "notes": notes}
    return out


# ---- reporting ----------------------------------------------------------------------------------------------------

# ---- entry point --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.grid", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/alternating.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", default="all",
                        help="'all', or comma-separated row and group names (main, ablation, support; see --list)")
    parser.add_argument("--out", type=Path, default=Path("runs/grid"))
    parser.add_argument("--steps", type=int, help="run.steps of every training run (default: the config's)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides for every run, e.g. --set optim.lr=1e-3 tasks.math.eval_episodes=16")
    parser.add_argument("--special-tokens", nargs="*", metavar="TOKEN",
                        help="strings masked in the `*_mask` rows (default: the config's loss.special_tokens)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    parser.add_argument("--list", action="store_true", help="print the rows and their overrides, then exit")
    args = parser.parse_args(argv)
    if args.list:
        print(f"groups: {', '.join(GROUPS)}")
        for r in ROWS:
            what = "from the reference run" if r.reference else " ".join(r.overrides) + (" + mask" if r.masked else "")
            print(f"{r.name:14s} {r.label}\n{'':14s} {what}")
        return 0
    try:
        rows = select_rows(args.rows)
        base = load_config(args.config, list(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    special = base.loss.special_tokens if args.special_tokens is None else args.special_tokens
    why_not = {r.name: "not run: no special tokens to mask — pass --special-tokens TOK … or set "
               "loss.special_tokens in the config (the embedded zoo's student and teachers share one tokenizer)"
               for r in rows if r.masked and not special}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        reference: dict[str, Any] = {}
        if any(r.reference for r in rows):
            reference = run_one(args.config, run_overrides(None, seed, args, special), reference=True,
                                retry_failed=args.retry_failed)
        for row in rows:
            if row.name in why_not:
                continue
            run = dict(reference) if row.reference else run_one(
                args.config, run_overrides(row, seed, args, special), reference=False, retry_failed=args.retry_failed)
            runs.setdefault(row.name, {})[seed] = collect(run, row, [t.name for t in base.tasks])
    if ray.is_initialized():
        ray.shutdown()
    agg = aggregate(rows, runs, why_not)
    header = {"config": str(args.config), "seeds": args.seeds, "set": args.set, "steps": args.steps,
              "special_tokens": special if any(r.masked for r in rows) else []}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {**header, "rows": agg, "runs": runs}
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")  # keeps the rows' order
    markdown = to_markdown(agg, header, GROUPS, DIAGNOSTICS)
    atomic_write_text(args.out / "results.md", markdown + "\n")
    plot(agg, runs, args.out / "plots")
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'plots'}/")
    return 1 if any(r["status"] == "failed" for seeds in runs.values() for r in seeds.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
