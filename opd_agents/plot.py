"""`python -m opd_agents.plot runs/<name>` — redraw a run's curves into runs/<name>/plots/*.png."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd_agents.run.plot import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_agents.plot", description="Plot a run's metric curves.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").exists():
        print(f"error: {args.run_dir} has no metrics.jsonl", file=sys.stderr)
        return 2
    for path in plot_run(args.run_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
