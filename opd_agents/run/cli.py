"""Shared command-line parsing for the entry points: `CONFIG [section.key=value ...]` plus flags, the checks of their
paths, and how their errors read (one `error: ...` line, exit 2 for bad input)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from opd_agents.config import Config, ConfigError, load_config


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML run config, e.g. configs/alternating.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, values parsed as YAML "
                             "(e.g. loss.k=64 run.steps=10 tasks.math.max_turns=2)")
    return parser


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with overrides anywhere on the line: `CONFIG --checkpoint DIR key=value` as well as `CONFIG key=value
    --checkpoint DIR` (argparse's intermixed parsing; plain parsing stops collecting positionals at the first flag)."""
    return parser.parse_intermixed_args(argv)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_folder(path: Path, what: str) -> None:
    """ConfigError unless `path` is a folder or does not exist yet (it will be created)."""
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a folder; give a folder (it is created if missing)")


def load_or_exit(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        fail(str(exc))


def run_main(body: Callable[[], int | None]) -> int:
    """Run an entry point body: bad input (a ConfigError, a user's file that cannot be used, a run directory whose
    checkpoints all fail verification) is one `error: ...` line and exit code 2; a run stopped on purpose (non-finite
    updates, a chat template failing mid-run, a teacher, rollout workers or learner ranks failing past their retries or
    timeouts) one line and exit code 1."""
    from envs.user_files import UserFileError
    from opd_agents.chat_templates import ChatTemplateError
    from opd_agents.learner.group import LearnerError
    from opd_agents.rollout.group import RolloutWorkerError
    from opd_agents.run.checkpoint import CheckpointError
    from teachers.actor import TeacherError

    try:
        return int(body() or 0)
    except (ConfigError, CheckpointError, UserFileError) as exc:
        fail(str(exc))
    except (FloatingPointError, ChatTemplateError, TeacherError, RolloutWorkerError, LearnerError) as exc:
        fail(f"training stopped: {exc}", code=1)
