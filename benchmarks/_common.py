"""Shared plumbing of the benchmark scripts: isolated cases, tables, JSON results, machine facts, tiny models.

A benchmark script measures one thing, prints a table and writes `benchmarks/results/<name>.json`. Measurements
whose peak memory matters run one per fresh Python process (`<script> --case JSON`, see `run_case`): the peak is
that child's own `ru_maxrss` (from `os.wait4`), so no case inherits another's high-water mark. A child is started
with `RLIMIT_DATA` just under the memory the machine has free, so a case that does not fit fails with an allocation
error in that child instead of waking the kernel's OOM killer (which could pick another process on a shared box).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = ROOT / "benchmarks" / "results"
_RESULT_PREFIX = "RESULT "


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def available_gib() -> float:
    return _meminfo_kib("MemAvailable") / (1 << 20)


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Wall seconds (`time_s`) and this process's CPU seconds (`cpu_s`, all threads) of the block, filled on exit.

    On a shared machine CPU seconds move less than wall seconds when another job competes for the cores."""
    out: dict[str, float] = {}
    cpu, wall = cpu_seconds(), time.perf_counter()
    yield out
    out["time_s"], out["cpu_s"] = time.perf_counter() - wall, cpu_seconds() - cpu


def alternate(fns: dict[str, Callable[[], object]], min_calls: int,
              min_seconds: float) -> dict[str, list[dict[str, float]]]:
    """Call each function in turn (A B C A B C ...) until each has run `min_calls` times and the calls took
    `min_seconds` in all; each call's `timed` record, per function. Alternating keeps a neighbour job's load, or the
    box's drift, from landing on one path only."""
    reps: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    while (min(len(r) for r in reps.values()) < min_calls
           or sum(t["time_s"] for r in reps.values() for t in r) < min_seconds):
        for name, fn in fns.items():
            with timed() as t:
                fn()
            reps[name].append(t)
    return reps


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average shows whether the box was shared)."""
    import torch

    from opd_agents.devices import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "ram_gib": round(_meminfo_kib("MemTotal") / (1 << 20), 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def run_case(script: str | Path, case: dict[str, Any], python: str = sys.executable) -> dict[str, Any]:
    """Run `script --case JSON` in a fresh process; its result dict plus `peak_rss_mib` (the child's ru_maxrss) and
    `load_at_start` (the 1-minute load average when it started: above ~2, the 2 cores were shared).

    A failed child (non-zero exit, e.g. an allocation refused by the memory limit) gives `{"error": ...}`.
    """
    limit = int((available_gib() - 1.0) * (1 << 30))
    load = os.getloadavg()[0]  # how busy the box was when the case started

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    proc = subprocess.Popen([python, str(script), "--case", json.dumps(case)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=cap_memory)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / 1024  # KiB -> MiB
    lines = [line for line in out.splitlines() if line.startswith(_RESULT_PREFIX)]
    if proc.returncode or not lines:
        return case | {"error": f"exit code {proc.returncode} (memory limit {limit / (1 << 30):.1f} GiB)",
                       "peak_rss_mib": peak, "load_at_start": load}
    return case | json.loads(lines[-1][len(_RESULT_PREFIX):]) | {"peak_rss_mib": peak, "load_at_start": load}


def train_steps(config: Path, overrides: list[str], out: Path, name: str,
                timeout_s: float = 7200) -> tuple[list[dict[str, Any]], float]:
    """`python -m opd_agents.train config overrides` into `out/name`: its training-step metric records (each task's
    first step of the run dropped: env set-up and cold caches) and the process's wall seconds."""
    from opd_agents.run.metrics import read_metrics

    command = [sys.executable, "-m", "opd_agents.train", str(config), *overrides, f"run.output_dir={out}",
               f"run.name={name}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    seen: set[str] = set()
    kept = []
    for r in (r for r in read_metrics(out / name / "metrics.jsonl") if "time/step" in r):
        if r["task"] in seen:
            kept.append(r)
        seen.add(r["task"])
    return kept, wall


def main(doc: str, benchmark: Callable[[argparse.Namespace], None],
         measure: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
         add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """The command line every script shares: `[--quick]` runs the benchmark, `--case JSON` one isolated case;
    `add_args` adds a script's own options."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, for a smoke run")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    if args.case and measure is not None:
        print(_RESULT_PREFIX + json.dumps(measure(json.loads(args.case))), flush=True)
    else:
        benchmark(args)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(x) for x in row))
    Console(width=200).print(table)


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def save(name: str, payload: dict[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json`: the payload, the machine and the commit it ran at."""
    from opd_agents.run.provenance import code_version

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "machine": machine(), "code": code_version(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def train_env_tokenizer(out: Path, vocab_size: int = 1024) -> Path:
    """The zoo's tokenizer recipe (byte-level BPE + ChatML) trained on a little env text: 300 math demonstrations
    and the search expert's turns on 3 ALFWorld train games. Saved to `out`."""
    from opd_agents.zoo import demos
    from opd_agents.zoo.build import ALFWORLD_ENV, MATH_ENV
    from opd_agents.zoo.tokenizer import train_tokenizer

    pairs = demos.math_pairs(MATH_ENV, limit=300)
    pairs += [p for episode in demos.alfworld_episodes(ALFWORLD_ENV, limit=3) for p in episode]
    tokenizer = train_tokenizer(demos.corpus(pairs), vocab_size)
    tokenizer.save_pretrained(out)
    return out


def save_tiny_model(tokenizer_dir: Path, out: Path, name: str, vocab: int | None = None) -> Path:
    """A randomly initialised `build_tiny_model` of the zoo recipe's size for `name` (student, math-teacher,
    alfworld-teacher), optionally with its vocabulary grown to `vocab` rows, saved with its tokenizer to `out`."""
    from transformers import AutoTokenizer

    from opd_agents.zoo.build import DEFAULT_RECIPE
    from opd_agents.zoo.models import build_tiny_model

    recipe = DEFAULT_RECIPE.models[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny_model(tokenizer, recipe.size, seed=recipe.seed)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

