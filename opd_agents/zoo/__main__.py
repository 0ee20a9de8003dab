"""``python -m opd_agents.zoo build [--out DIR] [--force] [--threads N]``: build the embedded zoo and print its table.

Owns the command line only; the build is :func:`opd_agents.zoo.build.ensure_zoo`.
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
    build.add_argument("--threads", type=int, default=1, help="torch CPU threads for the build (default 1)")
    args = parser.parse_args(argv)

    from opd_agents.zoo.build import build_version, ensure_zoo, format_table
    from opd_agents.zoo.paths import MANIFEST, cache_root, is_complete

    target = args.out if args.out is not None else cache_root() / build_version()
    cached = is_complete(target) and not args.force
    folder = ensure_zoo(force=args.force, out=args.out, threads=args.threads)
    if cached:  # a fresh build has already printed its table
        print(format_table(json.loads((folder / MANIFEST).read_text())))
    print(f"zoo: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
