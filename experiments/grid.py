"""The paper's comparison grid in miniature: `python -m experiments.grid [options]`.

    python -m experiments.grid [--config configs/alternating.yaml] [--seeds 0 1 2] [--zoos 0 1 ...]
                               [--rows all|NAME,...] [--out runs/grid] [--steps N] [--set key=value ...]
                               [--special-tokens TOK ...]
    python -m experiments.grid --rerender DIR    # re-aggregate a stored grid's results.json: no training, no Ray
    python -m experiments.grid --merge SRC ... --out DIR   # pool stored grids' runs into one grid: no training

Each row is a set of config overrides (`ROWS` in `experiments.grid_rows`; `--list` prints them); each (zoo, row, seed)
is one run through the framework's own path — `load_config` with dotted overrides, `preflight`, `RunDir`, `Trainer.fit`
— into its own run directory. `--zoos Z …` lists zoo build seeds (`run.zoo_seed`: `zoo:<name>` model paths resolve to
the zoo built with that seed, built on first use; default: the config's `run.zoo_seed`, i.e. 0): every (row, seed) runs
on each. Run folders: `<out>/runs/<row>-s<seed>/` on zoo 0 (the layout from before `--zoos`, so earlier grids' runs are
reused) and `<out>/runs/<row>-z<zoo>-s<seed>/` on any other zoo. The `student` (before training) and `teacher` rows come
from one reference run per (zoo, seed) (`reference-s<seed>` / `reference-z<zoo>-s<seed>`: the student evaluated once,
then each task's teacher played as a policy), so training runs skip both (`run.eval_before=false`,
`eval.teacher_reference=false`).

Override order per run: the config file, then `--set` and `--steps`, then the row's own keys (rows fully specify
`loss.name/k/support/renormalize/special_tokens` and `rollout.top_p`), then zoo seed, seed, name and output folder.

Resume-friendly: a run whose `grid_status.json` says done is skipped (its config must be unchanged), a failed one
is skipped unless `--retry-failed`, and an interrupted one resumes from its last checkpoint (or restarts if it had
none). A run that fails is recorded — status, error and traceback in `grid_error.txt` — and the grid goes on.

Statistics: a cell is the mean over the runs that finished ± the standard error of the mean (sample std / √n; no ±
for a single run), followed by each run's value. Each training row other than `sampled` (sampled-token OPD, the
baseline) gets a paired t-test of each task's overall success against `sampled` over the runs both have with the
same (zoo, seed) — the same zoo and seeds, so the same step-1 rollouts where the rollout settings match: mean
difference in points, its SE, two-sided p with n − 1 degrees of freedom (no test with fewer than 2 pairs); both
computed in `experiments.grid_stats`.
The ablation, support and staleness rows are also paired against `topk` (the K=32 / top-p 0.9 / renormalised /
teacher top-K row of the paper's Tables 3–4, and the staleness-0 run of issue 45's study), and each support or
staleness row against every row of its group before it (`vs_rows`). The tests
are per comparison, with no correction for how many there are.

Writes `<out>/results.json` — the header (config, `code`: the commit it ran at, zoos, seeds, overrides, `wall_seconds`:
this invocation's wall time for the whole grid, in which runs it skipped as done cost nothing; `wall_seconds_total`: the
wall time of every invocation into this `--out` that wrote its results.json, i.e. the previous results.json's
`wall_seconds_total` (its `wall_seconds` for one from before that field; 0 without a readable one) plus `wall_seconds`;
each run keeps its own `seconds`, `commit` and `config_sha256`, and its `dir` without the machine's folders), `rows`
(per-row aggregates over every run: with one zoo that zoo's, with several pooled over all (zoo, seed) runs), `per_zoo`
(zoo → the same aggregates over that zoo's runs) and `runs` (`runs[row][key]`: every run's status, zoo and seed, eval
summary, diagnostics and curves; key = the seed on zoo 0, `z<zoo>-s<seed>` otherwise) —
`<out>/results.md` (per zoo: tables like the paper's Tables 1–4, success per task and task type; the paired tests;
training-stability diagnostics over the last 25% of steps; with several zoos then per task a pooled table: per-zoo
means, the pooled mean ± SE with every run's value, and the paired test over (zoo, seed) pairs) and
`<out>/plots/{success,curves}.png` (over all runs).
Rows a config cannot support are explained in the table, not dropped: the `*_mask` rows without special tokens
to mask, and any run whose config `load_config`/`preflight` reject (status `invalid`, with the message).
Exit code 1 when some run failed (all still reported), else 0.

`--rerender DIR` (every other option is ignored) re-renders a grid already run from its `DIR/results.json` alone:
it re-aggregates the stored per-run records with the statistics above and rewrites `DIR/results.json` (every run
record kept as stored; records from before `--zoos`, keyed by seed alone, get `zoo_seed` 0 and the seed from their
key; the header's fields kept, `zoos` inferred when absent, `wall_seconds` and `wall_seconds_total` kept or null,
and a `rerendered` note added), `DIR/results.md` and `DIR/plots/`. Other files in DIR are left alone. Rows keep the
stored order; a row in `ROWS` takes its label and group from there, a stored row no longer in `ROWS` keeps its stored
label and group. Exit code 0, or 2 when DIR has no readable results.json or one of the wrong shape (checked against
`StoredGrid` in `experiments.grid_aggregate`; nothing is written then).

`--merge SRC [SRC ...] --out DIR` pools the stored runs of several grids into one, with no training: grids of one
config (the same `config`, `set`, `steps` and `special_tokens` in their results.json) whose runs are disjoint (no
(row, zoo, seed) in two of them), e.g. each zoo run on another machine or day, since a 2-core machine runs one zoo's
grid in a few hours. DIR gets results.json, results.md and plots/ as one grid of every run (per-zoo and pooled tables,
paired tests over every (zoo, seed) pair); its header keeps each source's folder, commit, zoos, seeds and wall time
under `merged_from`, `wall_seconds` null (nothing ran) and `wall_seconds_total` their sum. Rows keep the first grid's
order, then rows only later grids have. `--out` is required and must be a new folder (not a source, no results.json).
Exit 2, nothing written, when a source is unreadable or has a run under another (zoo, seed)'s key, the grids'
settings differ, a (row, zoo, seed) is in two of them, or `--out` is not new.

Arguments are checked before anything runs, as `train` does (`error: ...`, exit 2): seeds and zoo seeds in the ranges
of `run.seed` / `run.zoo_seed`, `--steps` >= 0, `--out` a folder (or absent) whose results.md / plots/ can be
written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from envs.user_files import UserFileError, check_regular, read_text
from experiments.grid_aggregate import (
    aggregate,
    check_outputs,
    collect,
    merge,
    rerender,
    run_key,
    stored_json,
    stored_wall,
    zoo_runs,
)
from experiments.grid_report import plot, to_markdown
from experiments.grid_rows import DIAGNOSTICS, GROUPS, ROWS, Row, select_rows
from opd_agents.config import Config, ConfigError, dump_config, load_config
from opd_agents.run.checkpoint import latest_checkpoint
from opd_agents.run.evaluation import Evaluator
from opd_agents.run.preflight import preflight
from opd_agents.run.provenance import code_version, config_sha256, portable_path
from opd_agents.run.rundir import RunDir, atomic_write_json, atomic_write_text
from opd_agents.run.trainer import Trainer
from opd_agents.safe_yaml import MAX_BYTES
from opd_agents.seeding import seed_everything

STATUS_FILE = "grid_status.json"
MAX_ZOO_SEED = 10**6  # as run.zoo_seed


# ---- running ------------------------------------------------------------------------------------------------------

def run_name(name: str, zoo: int, seed: int) -> str:
    """A run's `run.name` (its folder under `<out>/runs`): `<name>-s<seed>` on zoo 0, so runs of grids from before
    `--zoos` stay valid, and `<name>-z<zoo>-s<seed>` on another zoo."""
    return f"{name}-s{seed}" if zoo == 0 else f"{name}-{run_key(zoo, seed)}"


def run_overrides(row: Row | None, zoo: int, seed: int, args: argparse.Namespace, special: list[str]) -> list[str]:
    """The dotted overrides of one run (`row` None = the reference run) on zoo build seed `zoo`."""
    over = list(args.set)
    if row is not None:
        over += [f"run.steps={args.steps}"] if args.steps is not None else []
        tokens = special if row.masked else []
        over += [*row.overrides, f"loss.special_tokens={json.dumps(tokens)}", "run.eval_before=false",
                 "eval.teacher_reference=false"]
    name = row.name if row is not None else "reference"
    return over + [f"run.zoo_seed={zoo}", f"run.seed={seed}", f"run.name={run_name(name, zoo, seed)}",
                   f"run.output_dir={args.out / 'runs'}"]


def _reference_eval(cfg: Config, run_dir: RunDir) -> None:
    """The student evaluated once ("before") and each task's teacher as a policy ("teacher")."""
    from opd_agents.rollout.group import RolloutGroup
    from opd_agents.run.cluster import init_ray

    seed_everything(cfg.run.seed)
    init_ray(cfg.ray)
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
    try:
        run_dir.check(resume=True)
        if run_dir.config_path.is_file() and read_text(run_dir.config_path, MAX_BYTES, "saved config") != dump_config(
                cfg):
            return out | {"status": "failed", "error": f"{run_dir.root} holds a run with a different config; delete "
                          "it or choose another --out"}
        previous = stored_json(status_path, "grid run status") if status_path.is_file() else {}
    except (ConfigError, UserFileError) as exc:
        return out | {"status": "failed", "error": f"{run_dir.root}: {exc}"}
    if previous.get("status") == "done" or (previous.get("status") == "failed" and not retry_failed):
        return out | previous | {"skipped": True}
    try:
        resolved = preflight(cfg)  # `zoo:` names resolved to folders (building the zoo on first use)
    except ConfigError as exc:
        return out | {"status": "invalid", "error": str(exc)}
    resume = not reference and latest_checkpoint(run_dir.checkpoints_dir) is not None
    if run_dir.root.exists() and not resume:
        shutil.rmtree(run_dir.root)  # an interrupted or failed attempt with nothing worth keeping
    print(f"[grid] {'resuming' if resume else 'running'} {run_dir.root}", flush=True)
    try:
        run_dir.create(cfg, resume=resume)
        if reference:
            _reference_eval(resolved, run_dir)
        else:
            Trainer(resolved, run_dir, resume=resume).fit()
        result = {"status": "done", "config_sha256": config_sha256(cfg), **code_version()}
    except Exception as exc:  # a failed run is a result of the grid, not the end of it
        atomic_write_text(run_dir.root / "grid_error.txt", traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(status_path, result)
    return out | result


def total_wall_seconds(previous: Path, this: float) -> float:
    """`wall_seconds_total` for an invocation that took `this` seconds: `previous` (the `results.json` it is about
    to replace) holds the total so far in `wall_seconds_total`, or — written before that field, or re-rendered from
    such a grid (null there) — in `wall_seconds`; 0 when the file is missing, unreadable, not a JSON object or has
    neither. Read as JSON alone: a corrupt file costs the earlier invocations' time, never this grid."""
    try:
        data = stored_json(previous, "previous grid results")
    except UserFileError:  # missing, not a regular file, too large, not JSON, not an object
        data = None
    stored = stored_wall(data) if isinstance(data, dict) else None
    return round((stored or 0.0) + this, 1)


# ---- entry point --------------------------------------------------------------------------------------------------

def check_arguments(args: argparse.Namespace) -> None:
    """ConfigError / UserFileError for an argument the grid cannot use, before anything runs or is written (the
    config itself is checked by `load_config`, each run's by `preflight`)."""
    bad = [s for s in args.seeds if not 0 <= s < 2**32]
    if bad:
        raise ConfigError(f"--seeds {bad[:4]}: every seed must be in [0, 2^32) (as run.seed)")
    bad = [z for z in args.zoos or [] if not 0 <= z <= MAX_ZOO_SEED]
    if bad:
        raise ConfigError(f"--zoos {bad[:4]}: every zoo build seed must be in [0, {MAX_ZOO_SEED}] (as run.zoo_seed)")
    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps {args.steps} must be >= 0")
    if (args.out.exists() or args.out.is_symlink()) and not args.out.is_dir():
        raise ConfigError(f"--out {str(args.out)!r} exists and is not a folder")
    if args.out.is_dir():
        check_outputs(args.out)
        if (args.out / "results.json").exists():
            check_regular(args.out / "results.json", "the grid's results.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.grid", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/alternating.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--zoos", type=int, nargs="+", metavar="ZOO_SEED",
                        help="zoo build seeds (run.zoo_seed) to run every (row, seed) on (default: the config's, 0)")
    parser.add_argument("--rows", default="all",
                        help="'all', or comma-separated row and group names (main, ablation, support, staleness; see "
                             "--list)")
    parser.add_argument("--out", type=Path, help="the grid's folder (default runs/grid; --merge: required, new)")
    parser.add_argument("--steps", type=int, help="run.steps of every training run (default: the config's)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides for every run, e.g. --set optim.lr=1e-3 tasks.math.eval_episodes=16")
    parser.add_argument("--special-tokens", nargs="*", metavar="TOKEN",
                        help="strings masked in the `*_mask` rows (default: the config's loss.special_tokens)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    parser.add_argument("--list", action="store_true", help="print the rows and their overrides, then exit")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="SRC",
                        help="aggregate the stored runs of these grids' results.json (one config, disjoint (zoo, seed) "
                        "runs) as one grid into --out (no training), then exit")
    parser.add_argument("--rerender", type=Path, metavar="DIR",
                        help="re-aggregate DIR/results.json's stored runs and rewrite it, DIR/results.md and "
                        "DIR/plots/ (no training; other options ignored), then exit")
    args = parser.parse_args(argv)
    if args.rerender is not None:
        return rerender(args.rerender)
    if args.merge is not None:
        if args.out is None:
            parser.error("--merge needs --out: a new folder for the pooled grid")
        return merge(args.out, args.merge)
    args.out = Path("runs/grid") if args.out is None else args.out
    try:
        check_arguments(args)
    except (ConfigError, UserFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(f"groups: {', '.join(GROUPS)}")
        for r in ROWS:
            what = "from the reference run" if r.reference else " ".join(r.overrides) + (" + mask" if r.masked else "")
            print(f"{r.name:14s} {r.label}\n{'':14s} {what}")
        return 0
    t0 = time.perf_counter()
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
    zoos = args.zoos if args.zoos is not None else [base.run.zoo_seed]
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for zoo in zoos:
        for seed in args.seeds:
            reference: dict[str, Any] = {}
            if any(r.reference for r in rows):
                reference = run_one(args.config, run_overrides(None, zoo, seed, args, special), reference=True,
                                    retry_failed=args.retry_failed)
            for row in rows:
                if row.name in why_not:
                    continue
                run = dict(reference) if row.reference else run_one(
                    args.config, run_overrides(row, zoo, seed, args, special), reference=False,
                    retry_failed=args.retry_failed)
                record = {"zoo_seed": zoo, "seed": seed} | collect(run, row, [t.name for t in base.tasks])
                if "dir" in record:
                    record["dir"] = portable_path(record["dir"])  # no machine path in the stored results
                runs.setdefault(row.name, {})[run_key(zoo, seed)] = record
    if ray.is_initialized():
        ray.shutdown()
    per_zoo = {zoo: aggregate(rows, zoo_runs(runs, zoo), why_not) for zoo in zoos}
    pooled = aggregate(rows, runs, why_not)
    wall = round(time.perf_counter() - t0, 1)
    header = {"config": portable_path(args.config), "code": code_version(), "zoos": zoos, "seeds": args.seeds,
              "set": args.set, "steps": args.steps,
              "special_tokens": special if any(r.masked for r in rows) else [], "wall_seconds": wall,
              "wall_seconds_total": total_wall_seconds(args.out / "results.json", wall)}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {**header, "rows": pooled, "per_zoo": {str(z): a for z, a in per_zoo.items()}, "runs": runs}
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")  # keeps the rows' order
    markdown = to_markdown(per_zoo, pooled, header, GROUPS, DIAGNOSTICS)
    atomic_write_text(args.out / "results.md", markdown + "\n")
    plot(pooled, runs, args.out / "plots")
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'plots'}/")
    return 1 if any(r["status"] == "failed" for seeds in runs.values() for r in seeds.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
