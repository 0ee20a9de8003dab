"""A grid's results from its runs: each run's evaluation, diagnostics and curves collected from its folder, the
per-row aggregates and paired tests (`experiments.grid_stats`), and `--rerender`, which recomputes them from a stored
results.json alone (`experiments.grid`'s docstring says what each field means)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from envs.user_files import MIB, UserFileError, check_regular, load_json, validate
from experiments.grid_report import plot, to_markdown
from experiments.grid_rows import BASELINE, DIAGNOSTICS, GROUPS, ROWS, Row, within_baselines
from experiments.grid_stats import mean_se, paired_test
from opd_agents.run.metrics import read_metrics
from opd_agents.run.provenance import portable_path
from opd_agents.run.rundir import atomic_write_text

TAIL = 0.25  # diagnostics: mean over the last quarter of training steps
RESULTS_MAX_BYTES = 256 * MIB


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
    summary = stored_json(root / "eval.json", "run evaluation") if (root / "eval.json").is_file() else {}
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


# ---- aggregating --------------------------------------------------------------------------------------------------

def _overall(metric: str) -> bool:
    """Whether `metric` is a task's overall success (`<task>/success`, not a per-type or per-level one)."""
    return metric.split("/")[1:] == ["success"]


def _by_run(stat: dict[str, Any] | None) -> dict[str, float]:
    return dict(zip(stat["runs"], stat["values"])) if stat else {}


def _run_label(run: dict[str, Any]) -> str:
    return f"seed {run['seed']}" if run["zoo_seed"] == 0 else f"zoo {run['zoo_seed']}, seed {run['seed']}"


def aggregate(rows: list[Row], runs: dict[str, dict[str, dict[str, Any]]], why_not: dict[str, str],
              ) -> dict[str, dict[str, Any]]:
    """Per row, over its runs (`runs[row][key]`, records with `zoo_seed` and `seed`): success per (task, metric)
    over the runs that finished and diagnostics over every run that logged them (failed ones too), each a `mean_se`;
    notes on runs that did not finish; `vs_sampled`: for each training row but BASELINE, the `paired_test` of
    each task's overall success against BASELINE's (empty for the others, or when BASELINE has no results); and
    `vs_rows`: other row → the same tests against that row, for the comparisons of `within_baselines`."""
    out = {}
    for row in rows:
        records = runs.get(row.name, {})
        success: dict[str, dict[str, float]] = {}
        for key, r in records.items():
            if r["status"] == "done":
                for task, res in r.get("eval", {}).items():
                    for metric, v in res.items():
                        if not metric.endswith("episodes"):  # item counts (also `level_<L>/episodes`), not rates
                            success.setdefault(f"{task}/{metric}", {})[key] = v
        diag: dict[str, dict[str, float]] = {}
        for key, r in records.items():  # a collapsed run's diagnostics are the interesting part: keep failed runs'
            for metric, v in r.get("diagnostics", {}).items():
                diag.setdefault(metric, {})[key] = v
        notes = [why_not[row.name]] if row.name in why_not else []
        notes += [f"{_run_label(r)}: {r['status']}: {r.get('error', '')}".strip(": ") for r in records.values()
                  if r["status"] != "done"]
        notes += [f"{_run_label(r)}: {r['note']}" for r in records.values() if r.get("note")]
        done = sum(r["status"] == "done" and bool(r.get("eval")) for r in records.values())
        out[row.name] = {"label": row.label, "group": row.group, "seeds_done": done, "seeds": len(records),
                         "success": {k: mean_se(v) for k, v in success.items()},
                         "diagnostics": {k: mean_se(v) for k, v in diag.items()}, "notes": notes, "vs_sampled": {},
                         "vs_rows": {}}

    def tests(name: str, base_name: str) -> dict[str, Any]:
        mine, base = out[name]["success"], out.get(base_name, {}).get("success", {})
        return {m: paired_test(_by_run(mine.get(m)), _by_run(stat)) for m, stat in base.items() if _overall(m)}

    for row in rows:
        if not row.reference and row.name != BASELINE:
            out[row.name]["vs_sampled"] = tests(row.name, BASELINE)
            for base_name in within_baselines(row, rows):
                if found := tests(row.name, base_name):
                    out[row.name]["vs_rows"][base_name] = found
    return out


def run_key(zoo: int, seed: int) -> str:
    """A run's key in `runs[row]`: the seed on zoo 0 (as before `--zoos`), `z<zoo>-s<seed>` on another zoo."""
    return str(seed) if zoo == 0 else f"z{zoo}-s{seed}"


def zoo_runs(runs: dict[str, dict[str, dict[str, Any]]], zoo: int) -> dict[str, dict[str, dict[str, Any]]]:
    """The runs made on zoo build seed `zoo`, in the same `runs[row][key]` shape."""
    return {name: {k: r for k, r in records.items() if r["zoo_seed"] == zoo} for name, records in runs.items()}


# ---- re-rendering a stored grid -----------------------------------------------------------------------------------

RERENDERED = ("aggregates, results.md and plots/ recomputed from the stored per-run records by `python -m "
              "experiments.grid --rerender` (no run repeated)")


def _stored_run(key: str, record: dict[str, Any]) -> dict[str, Any]:
    """A stored run record with its `zoo_seed` and `seed` first: as stored, or for a record from before `--zoos`
    (keyed by its seed, on zoo 0) from its key (`<seed>` or `z<zoo>-s<seed>`)."""
    if "zoo_seed" in record and "seed" in record:
        return record
    zoo, seed = (key[1:].split("-s", 1) if key.startswith("z") else ("0", key))
    return {"zoo_seed": int(zoo), "seed": int(seed)} | record


def _stored_rows(stored: dict[str, dict[str, Any]], runs: dict[str, dict[str, dict[str, Any]]]) -> list[Row]:
    """The rows of a stored grid in its order (then any row with runs but no aggregate): a row of `ROWS` as defined
    there; any other as a Row with its stored label and group, a reference row if none of its runs trained (no run
    record has `diagnostics`, which `collect` adds to every training run that got a run folder)."""
    known = {r.name: r for r in ROWS}
    out = []
    for name in [*stored, *(n for n in runs if n not in stored)]:
        if name in known:
            out.append(known[name])
            continue
        records = runs.get(name, {}).values()
        trained = any("diagnostics" in r for r in records) or not records
        a = stored.get(name, {})
        out.append(Row(name, a.get("label", name), a.get("group", "other"), reference=not trained))
    return out


# Names a stored grid may use for rows, run keys, tasks and metrics: no control characters, no `$` (matplotlib would
# read `$...$` in a label as math), bounded.
_Name = Annotated[str, StringConstraints(pattern=r"^[^$\x00-\x1f]{1,200}$")]
_RunKey = Annotated[str, StringConstraints(pattern=r"^(?:\d{1,10}|z\d{1,7}-s\d{1,10})$")]


class _StoredRun(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    zoo_seed: int = Field(None, ge=0, strict=True)
    seed: int = Field(None, ge=0, strict=True)
    error: str = ""
    note: str = ""
    eval: dict[_Name, dict[_Name, float]] = {}
    diagnostics: dict[_Name, float] = {}
    curves: dict[_Name, list[tuple[int, float]]] = {}


class _StoredRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str = ""
    group: _Name = "other"
    notes: list[str] = []


class StoredGrid(BaseModel):
    """What `--rerender` reads of a results.json (other fields are kept as stored, unchecked)."""

    model_config = ConfigDict(extra="allow")
    rows: dict[_Name, _StoredRow]
    runs: dict[_Name, dict[_RunKey, _StoredRun]]
    zoos: list[Annotated[int, Field(ge=0, strict=True)]] = []
    seeds: list[Annotated[int, Field(ge=0, strict=True)]] | None = None


def stored_json(path: Path, what: str, max_bytes: int = RESULTS_MAX_BYTES) -> dict[str, Any]:
    """A JSON object this project wrote, read through `envs.user_files` (at most `max_bytes`, regular files only; NaN
    kept)."""
    data = load_json(path, max_bytes, what, allow_nan=True)
    if not isinstance(data, dict):
        raise UserFileError(f"{what} {str(path)!r} holds a {type(data).__name__}, not a JSON object")
    return data


def check_outputs(out: Path) -> None:
    """UserFileError unless `out`'s results.md / plots/ can be written (absent, a regular file, a folder)."""
    for name, folder in (("results.md", False), ("plots", True)):
        path = out / name
        if (path.exists() or path.is_symlink()) and path.is_dir() != folder:
            kind = "a folder" if folder else "a regular file"
            raise UserFileError(f"{str(path)!r} is in the way: it must be {kind}; move it away")
        if path.exists() and not folder:
            check_regular(path, "the grid's results.md")


def _load_stored(folder: Path, option: str) -> dict[str, Any]:
    """`folder/results.json` checked against `StoredGrid`, its run records given `zoo_seed` and `seed`; raises
    UserFileError."""
    if not folder.is_dir():
        raise UserFileError(f"{option} {str(folder)!r} is not a folder")
    try:
        data = stored_json(folder / "results.json", "grid results")
        validate(StoredGrid, data, folder / "results.json", "grid results")
    except UserFileError as exc:
        raise UserFileError(f"{folder / 'results.json'}: not a grid's results ({exc})") from exc
    data["runs"] = {name: {key: _stored_run(key, r) for key, r in records.items()}
                    for name, records in data["runs"].items()}
    for name, records in data["runs"].items():
        for key, r in records.items():
            expected = run_key(r["zoo_seed"], r["seed"])
            if key != expected:
                raise UserFileError(f"{folder / 'results.json'}: not a grid's results (run {name}/{key} says zoo "
                                    f"{r['zoo_seed']}, seed {r['seed']}, whose key is {expected})")
    return data


def _render(out: Path, header: dict[str, Any], stored_rows: dict[str, dict[str, Any]],
            runs: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Aggregate stored run records (rows in `stored_rows`' order) and write results.json, results.md, plots/."""
    rows = _stored_rows(stored_rows, runs)
    # A row that was not run (e.g. a mask row without special tokens) has no runs; its first stored note says why.
    why_not = {n: a["notes"][0] for n, a in stored_rows.items() if not runs.get(n) and a.get("notes")}
    header.setdefault("zoos", sorted({r["zoo_seed"] for records in runs.values() for r in records.values()}) or [0])
    header.setdefault("wall_seconds", None)  # grids from before it was recorded
    header.setdefault("wall_seconds_total", None)  # grids from before it was recorded: unknown, not this invocation's
    groups = GROUPS | {r.group: f"Other rows (group `{r.group}`)" for r in rows if r.group not in GROUPS}
    per_zoo = {zoo: aggregate(rows, zoo_runs(runs, zoo), why_not) for zoo in header["zoos"]}
    pooled = aggregate(rows, runs, why_not)
    results = {**header, "rows": pooled, "per_zoo": {str(z): a for z, a in per_zoo.items()}, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    # results.json last: a failure while rendering leaves the folder's previous results.json in place.
    atomic_write_text(out / "results.md", to_markdown(per_zoo, pooled, header, groups, DIAGNOSTICS) + "\n")
    plot(pooled, runs, out / "plots")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")


def rerender(out: Path) -> int:
    """`--rerender DIR`: re-aggregate `DIR/results.json`'s stored runs and rewrite it, `results.md` and `plots/`."""
    try:
        data = _load_stored(out, "--rerender")
        check_outputs(out)
    except UserFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header = {k: v for k, v in data.items() if k not in ("rows", "per_zoo", "runs")}
    header["rerendered"] = RERENDERED
    _render(out, header, data["rows"], data["runs"])
    print(f"re-rendered {out / 'results.json'}, {out / 'results.md'}, {out / 'plots'}/")
    return 0


# The header fields two grids must share to be pooled: the same config, overrides and step count for every run.
SAME_SETTINGS = ("config", "set", "steps", "special_tokens")
PROVENANCE = ("code", "zoos", "seeds", "wall_seconds_total")  # kept per source under `merged_from`


def stored_wall(grid: dict[str, Any]) -> float | None:
    """A stored grid's wall time over all its invocations: `wall_seconds_total`, else (a grid from before it)
    `wall_seconds`; None when neither is a finite number ≥ 0."""
    for key in ("wall_seconds_total", "wall_seconds"):
        value = grid.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
            return float(value)
    return None


def merge(out: Path, sources: list[Path]) -> int:
    """`--merge SRC ... --out DIR`: the runs of several stored grids of one config (disjoint (zoo, seed) runs, e.g. each
    zoo run on another machine or day) aggregated as one grid into DIR — pooled and per-zoo tables, paired tests over
    every (zoo, seed) pair — with each source's provenance under `merged_from`. Nothing is rerun."""
    try:
        grids = [_load_stored(s, "--merge") for s in sources]
        for name in SAME_SETTINGS:
            values = {json.dumps(g.get(name), sort_keys=True) for g in grids}
            if len(values) > 1:
                raise UserFileError(f"the grids differ in {name!r} ({', '.join(sorted(values))}): only grids of one "
                                    "config, overrides and step count can be pooled")
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        stored_rows: dict[str, dict[str, Any]] = {}
        for source, g in zip(sources, grids):
            for name, records in g["runs"].items():
                for key, record in records.items():
                    if key in runs.get(name, {}):
                        raise UserFileError(f"run {name}/{key} is in two of the grids ({source} and an earlier one): "
                                            "merge grids of disjoint (zoo, seed) runs")
                    runs.setdefault(name, {})[key] = record
            for name, row in g["rows"].items():
                stored_rows.setdefault(name, row)
        if out.resolve() in {s.resolve() for s in sources}:
            raise UserFileError(f"--out {str(out)!r} is one of the grids merged: merge into a new folder")
        if (out / "results.json").exists():
            raise UserFileError(f"--out {str(out)!r} already holds a results.json: merge into a new folder")
        if out.exists() and not out.is_dir():
            raise UserFileError(f"--out {str(out)!r} exists and is not a folder")
        check_outputs(out)
    except UserFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    totals = [stored_wall(g) for g in grids]
    header = {name: grids[0].get(name) for name in SAME_SETTINGS}
    header |= {
        "zoos": sorted({z for g in grids for z in g.get("zoos") or
                        {r["zoo_seed"] for records in g["runs"].values() for r in records.values()}}),
        "seeds": sorted({s for g in grids for s in g.get("seeds") or []}),
        "wall_seconds": None,  # no invocation ran anything
        "wall_seconds_total": None if None in totals else round(sum(totals), 1),
        "merged_from": [{"dir": portable_path(s)} | {k: g.get(k) for k in PROVENANCE} for s, g in zip(sources, grids)],
    }
    _render(out, header, stored_rows, runs)
    print(f"merged {len(sources)} grids into {out / 'results.json'}, {out / 'results.md'}, {out / 'plots'}/")
    return 0
