"""`python -m opd_agents.evaluate CONFIG --checkpoint PATH [overrides…]` — per-task success of a policy.

Plays each task's eval split with the checkpoint (default: the config's student) and, with `--teacher`, each
task's teacher as a policy for reference. Writes `eval.json` (into --out, default
`runs/<name>/eval_<checkpoint name>/`) and prints a table.
"""
from __future__ import annotations

import sys
from pathlib import Path

from opd_agents.run.cli import base_parser, load_or_exit, run_main


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m opd_agents.evaluate", "Evaluate a student checkpoint on every task's eval split.")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (runs/<name>/checkpoints/step_N) or any "
                        "save_pretrained folder; default: the config's student")
    parser.add_argument("--teacher", action="store_true", help="also evaluate each task's teacher as a policy")
    parser.add_argument("--out", type=Path, help="folder for eval.json (default: runs/<name>/eval_<checkpoint name>)")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args)

    def body() -> int:
        from opd_agents.config import ConfigError
        from opd_agents.rollout.group import RolloutGroup
        from opd_agents.run.cluster import init_ray
        from opd_agents.run.evaluation import Evaluator
        from opd_agents.run.preflight import preflight
        from opd_agents.run.rundir import RunDir

        resolved = preflight(cfg)
        student = resolved.student
        if args.checkpoint is not None:
            if not (args.checkpoint / "config.json").is_file():
                raise ConfigError(f"--checkpoint {str(args.checkpoint)!r} is not a model folder (no config.json); "
                                  "pass runs/<name>/checkpoints/step_<N>")
            student = student.model_copy(update={"path": str(args.checkpoint)})
        run_root = RunDir.for_config(cfg).root
        out = args.out or (run_root / f"eval_{args.checkpoint.name}" if args.checkpoint else run_root / "eval_student")
        evaluator = Evaluator(resolved, RunDir(Path(out)))
        init_ray(cfg.ray)
        group = RolloutGroup(student, cfg.rollout, imports=cfg.run.imports, seed=cfg.run.seed)
        try:
            evaluator.run(group, step=0, label="final")
        finally:
            group.shutdown()  # before the teacher reference, which needs the same Ray resources
        if args.teacher:
            evaluator.run_teacher_reference()
        evaluator.write_summary()
        print(f"wrote {Path(out) / 'eval.json'}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
