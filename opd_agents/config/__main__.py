"""`python -m opd_agents.config --markdown`: print the config's field reference (the source of docs/config.md)."""
from __future__ import annotations

import argparse

from opd_agents.config.reference import markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_agents.config", description=__doc__)
    parser.add_argument("--markdown", action="store_true", required=True,
                        help="print the field reference as Markdown (docs/config.md is this output)")
    parser.parse_args(argv)
    print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
