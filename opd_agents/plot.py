"""`python -m opd_agents.plot runs/<name>` — redraw a run's curves into runs/<name>/plots/*.png.

Checks its argument first, as `train` does (one `error: ...` line, exit 2, nothing written): the run folder is a
folder, its metrics.jsonl a regular file, its plots/ a folder or absent.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from envs.user_files import UserFileError, check_regular
from opd_agents.config import ConfigError
from opd_agents.run.cli import check_folder, fail
from opd_agents.run.report import render_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_agents.plot", description="Plot a run's metric curves.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if not args.run_dir.is_dir():
            raise ConfigError(f"{str(args.run_dir)!r} is not a run folder (runs/<name>)")
        check_regular(args.run_dir / "metrics.jsonl", "the run's metrics")
        check_folder(args.run_dir / "plots", "the run's plots folder")
        written = render_run(args.run_dir)
    except (ConfigError, UserFileError) as exc:
        fail(str(exc))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
