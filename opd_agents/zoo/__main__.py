"""``python -m opd_agents.zoo build [--out DIR] [--force] [--threads N] [--workers W] [--build-seed S]``: build the
embedded zoo and print its table.

``python -m opd_agents.zoo diagnose MODEL [--games N]``: an ALFWorld model's per-decision agreement with the zoo's
expert on the eval games (which kinds of decision it has not learned). Owns the command line only; the work is in
:mod:`opd_agents.zoo.build` and :mod:`opd_agents.zoo.scoring`. Arguments are checked before anything is built or
loaded, as `train` does (one ``error: ...`` line, exit 2): numbers in their ranges, ``--out`` empty, new or a zoo
(never another folder), ``MODEL``'s config.json and tokenizer (``opd_agents.model_files``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from envs.user_files import MIB, load_json

MAX_BUILD_SEED = 10**6  # as run.zoo_seed
MAX_THREADS = 256
MAX_WORKERS = 64
MAX_GAMES = 10_000
MANIFEST_MAX_BYTES = 4 * MIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_agents.zoo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the tokenizer, teachers and student (cached)")
    build.add_argument("--out", type=Path, help="build here instead of the cache folder (new, empty, or a zoo)")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    build.add_argument("--threads", type=int, default=1, help="torch CPU threads per build process (default 1)")
    build.add_argument("--workers", type=int, help="build processes (default: one per core, at most 2)")
    build.add_argument("--build-seed", type=int, default=0,
                       help=f"build an independent zoo of the same recipe and data (0..{MAX_BUILD_SEED}; default 0, "
                            "the zoo `zoo:` names resolve to; a run picks another with run.zoo_seed)")
    diagnose = commands.add_parser("diagnose", help="per-decision agreement of an ALFWorld model with the expert")
    diagnose.add_argument("model", help="model folder or zoo:<name>")
    diagnose.add_argument("--games", type=int, default=30, help="eval games whose expert play is scored")
    args = parser.parse_args(argv)
    try:
        checked = _check_diagnose(args) if args.command == "diagnose" else _check_build(args)
    except (ValueError, TimeoutError) as exc:  # a bad argument or file (ConfigError, UserFileError), a held lock
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _diagnose(*checked, args.games) if args.command == "diagnose" else _build(args, checked)


def _check_int(flag: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"{flag} {value} is out of range; choose {low} <= {flag.lstrip('-')} <= {high}")


def _check_build(args: argparse.Namespace) -> Path:
    """The folder the build goes to, after checking every argument."""
    from opd_agents.zoo.paths import check_target
    from opd_agents.zoo.resolve import zoo_dir

    _check_int("--build-seed", args.build_seed, 0, MAX_BUILD_SEED)
    _check_int("--threads", args.threads, 1, MAX_THREADS)
    _check_int("--workers", args.workers, 1, MAX_WORKERS)
    target = args.out if args.out is not None else zoo_dir(build_seed=args.build_seed)
    check_target(target)
    return target


def _build(args: argparse.Namespace, target: Path) -> int:
    from opd_agents.zoo.build import ensure_zoo, format_table
    from opd_agents.zoo.paths import MANIFEST, is_complete

    cached = is_complete(target) and not args.force
    folder = ensure_zoo(force=args.force, out=args.out, threads=args.threads, workers=args.workers,
                        build_seed=args.build_seed)
    if cached:  # a fresh build has already printed its table
        print(format_table(load_json(folder / MANIFEST, MANIFEST_MAX_BYTES, "zoo manifest")))
    print(f"zoo: {folder}")
    return 0


def _check_diagnose(args: argparse.Namespace) -> tuple[str, Any]:
    """(model folder, its tokenizer), after checking the arguments and the folder's files."""
    from transformers import AutoTokenizer

    from opd_agents.model_files import check_folder_files, check_model_size, check_tokenizer_fits, model_config
    from opd_agents.zoo.resolve import resolve_model_path

    _check_int("--games", args.games, 1, MAX_GAMES)
    folder = resolve_model_path(args.model)
    if not Path(folder).is_dir():
        raise ValueError(f"MODEL {args.model!r} is not a model folder or zoo:<name>")
    check_folder_files("MODEL", folder)
    config = model_config("MODEL", folder)
    check_model_size("MODEL", config, "float32", local=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise ValueError(f"MODEL {args.model!r}: cannot load its tokenizer ({type(exc).__name__})") from None
    check_tokenizer_fits("MODEL", tokenizer, config)
    return folder, tokenizer


def _diagnose(folder: str, tokenizer: Any, games: int) -> int:
    from transformers import AutoModelForCausalLM

    from opd_agents.zoo.build import DEFAULT_RECIPE
    from opd_agents.zoo.scoring import alfworld_decision_accuracy

    model = AutoModelForCausalLM.from_pretrained(folder)
    counts = alfworld_decision_accuracy(model, tokenizer, DEFAULT_RECIPE.alfworld_env, games)
    for kind, c in sorted(counts.items(), key=lambda kv: (kv[0] == "all", -kv[1]["total"])):
        print(f"{kind:<12}{c['right']:>5} / {c['total']:<5}{c['right'] / c['total']:>7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
