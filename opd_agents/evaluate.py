"""`python -m opd_agents.evaluate CONFIG --checkpoint PATH [overrides…]` — per-task success of a policy.

Plays each task's eval split with the checkpoint (default: the config's student, the untrained one: its column is
`student (before)`; a checkpoint's column is `checkpoint <folder name>`) and, with `--teacher`, each task's teacher as
a policy for reference, on the same eval items. Writes `eval.json` (into --out, default
`runs/<name>/eval_<checkpoint name>/`) and prints a table. The checkpoint is checked as the run's student, before
anything starts: its `config.json` (shape, and a size this machine can hold), tokenizer and chat template.
"""
from __future__ import annotations

import sys
from pathlib import Path

from opd_agents.config import ConfigError
from opd_agents.run.cli import base_parser, check_folder, load_or_exit, parse_cli, run_main


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m opd_agents.evaluate", "Evaluate a student checkpoint on every task's eval split.")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (runs/<name>/checkpoints/step_N) or any "
                        "save_pretrained folder; default: the config's student")
    parser.add_argument("--teacher", action="store_true", help="also evaluate each task's teacher as a policy")
    parser.add_argument("--out", type=Path, help="folder for eval.json (default: runs/<name>/eval_<checkpoint name>)")
    args = parse_cli(parser, argv)
    cfg = load_or_exit(args)

    def body() -> int:
        from envs.user_files import check_regular
        from opd_agents.rollout.group import RolloutGroup
        from opd_agents.run.cluster import init_ray
        from opd_agents.run.evaluation import Evaluator
        from opd_agents.run.preflight import preflight
        from opd_agents.run.rundir import RunDir

        checked = cfg
        if args.checkpoint is not None:  # the checkpoint is the student: preflight checks its files like any model's
            if not args.checkpoint.is_dir():
                raise ConfigError(f"--checkpoint {str(args.checkpoint)!r} is not a folder; pass "
                                  "runs/<name>/checkpoints/step_<N> or a save_pretrained folder")
            check_regular(args.checkpoint / "config.json", "--checkpoint's model config")
            checked = cfg.model_copy(update={"student": cfg.student.model_copy(
                update={"path": str(args.checkpoint.resolve())})})
        run_root = RunDir.for_config(cfg).root
        out = args.out or (run_root / f"eval_{args.checkpoint.name}" if args.checkpoint else run_root / "eval_student")
        check_folder(Path(out), "--out")
        RunDir(Path(out)).check(resume=True)  # what it holds must be what a run directory holds
        resolved = preflight(checked)
        evaluator = Evaluator(resolved, RunDir(Path(out)))
        # The column names what was evaluated: the config's own student is the untrained one ("before").
        label = "final" if args.checkpoint is not None else "before"
        if args.checkpoint is not None:
            evaluator.names["final"] = f"checkpoint {args.checkpoint.name}"
        init_ray(cfg.ray)
        group = RolloutGroup(resolved.student, cfg.rollout, imports=cfg.run.imports, seed=cfg.run.seed)
        try:
            evaluator.run(group, step=0, label=label)
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
