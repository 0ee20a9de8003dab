"""``python -m opd_agents.zoo build [--out DIR] [--force] [--threads N] [--workers W] [--build-seed S]``: build the
embedded zoo and print its table.

``python -m opd_agents.zoo diagnose MODEL [--games N]``: an ALFWorld model's per-decision agreement with the zoo's
expert on the eval games (which kinds of decision it has not learned). Owns the command line only; the work is in
:mod:`opd_agents.zoo.build` and :mod:`opd_agents.zoo.scoring`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_agents.zoo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the tokenizer, teachers and student (cached)")
    build.add_argument("--out", type=Path, help="build here instead of the cache folder")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    build.add_argument("--threads", type=int, default=1, help="torch CPU threads per build process (default 1)")
    build.add_argument("--workers", type=int, help="build processes (default: one per core, at most 2)")
    build.add_argument("--build-seed", type=int, default=0,
                       help="build an independent zoo of the same recipe and data (default 0, the zoo `zoo:` names "
                            "resolve to; a run picks another with run.zoo_seed)")
    diagnose = commands.add_parser("diagnose", help="per-decision agreement of an ALFWorld model with the expert")
    diagnose.add_argument("model", help="model folder or zoo:<name>")
    diagnose.add_argument("--games", type=int, default=30, help="eval games whose expert play is scored")
    args = parser.parse_args(argv)
    if args.command == "diagnose":
        return _diagnose(args.model, args.games)

    from opd_agents.zoo.build import ensure_zoo, format_table
    from opd_agents.zoo.paths import MANIFEST, is_complete
    from opd_agents.zoo.resolve import zoo_dir

    target = args.out if args.out is not None else zoo_dir(build_seed=args.build_seed)
    cached = is_complete(target) and not args.force
    folder = ensure_zoo(force=args.force, out=args.out, threads=args.threads, workers=args.workers,
                        build_seed=args.build_seed)
    if cached:  # a fresh build has already printed its table
        print(format_table(json.loads((folder / MANIFEST).read_text())))
    print(f"zoo: {folder}")
    return 0


def _diagnose(model_path: str, games: int) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_agents.zoo.build import DEFAULT_RECIPE
    from opd_agents.zoo.resolve import resolve_model_path
    from opd_agents.zoo.scoring import alfworld_decision_accuracy

    folder = resolve_model_path(model_path)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    counts = alfworld_decision_accuracy(model, tokenizer, DEFAULT_RECIPE.alfworld_env, games)
    for kind, c in sorted(counts.items(), key=lambda kv: (kv[0] == "all", -kv[1]["total"])):
        print(f"{kind:<12}{c['right']:>5} / {c['total']:<5}{c['right'] / c['total']:>7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
