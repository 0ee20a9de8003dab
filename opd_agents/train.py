"""`python -m opd_agents.train CONFIG [overrides…] [--resume]` — the main job.

Validates the config and everything it points at (`run/preflight.py`, before any work; `zoo:` models are resolved,
the zoo built on first use), creates the run directory with the config, then runs the trainer loop
(`run/trainer.py`). `run.steps=0` stops after validation and set-up.
"""
from __future__ import annotations

import sys

from opd_agents.run.cli import base_parser, load_or_exit, parse_cli, run_main
from opd_agents.run.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m opd_agents.train", "Train a student by on-policy distillation.")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in runs/<name> from its last checkpoint")
    args = parse_cli(parser, argv)
    cfg = load_or_exit(args)

    def body() -> int:
        from opd_agents.run.preflight import preflight

        run_dir = RunDir.for_config(cfg)
        run_dir.check(resume=args.resume)  # before preflight, which may wait minutes for a first-use zoo build
        resolved = preflight(cfg)
        run_dir.create(cfg, resume=args.resume)
        if cfg.run.steps == 0 and not args.resume:
            print(f"config valid; run directory {run_dir.root} ready (run.steps=0: nothing to train)")
            return 0
        from opd_agents.run.trainer import Trainer

        Trainer(resolved, run_dir, resume=args.resume).fit()
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
