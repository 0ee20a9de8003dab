"""`python -m opd_agents.plan CONFIG [--gpus N] [--gpu-memory-gib G] [section.key=value ...]`: the memory plan.

Prints each GPU actor's estimated memory (learner ranks, rollout workers, teachers) against the GPU's size and says
which do not fit and a layout that does, without starting anything (opd_agents/run/memory_plan.py). Exit 0 when
everything fits, 2 otherwise (or on a bad config). Model shapes come from the models' `config.json`: local folders,
or hub ids transformers can resolve (its cache, or the hub where reachable).
"""
from __future__ import annotations

import sys

from opd_agents.run.cli import base_parser, load_or_exit, parse_cli, run_main

H100_GIB = 80.0


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m opd_agents.plan", __doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs available (default: not checked)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help=f"memory of one GPU in GiB (default: this machine's GPU 0, else {H100_GIB:g})")
    args = parse_cli(parser, argv)
    if args.gpus is not None and args.gpus < 1 or args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        parser.error("--gpus and --gpu-memory-gib must be positive")
    cfg = load_or_exit(args)

    def body() -> int:
        import torch

        from opd_agents.config import ConfigError
        from opd_agents.run.memory_plan import GIB, model_shapes, plan, uses_gpus

        if not uses_gpus(cfg):
            print("no actor of this config uses a GPU (run.device, learner/rollout num_gpus_per_worker, teachers' "
                  "num_gpus): nothing to plan")
            return 0
        if args.gpu_memory_gib is not None:
            gpu_bytes = args.gpu_memory_gib * GIB
        elif torch.cuda.is_available():
            gpu_bytes = float(torch.cuda.get_device_properties(0).total_memory)
        else:
            gpu_bytes = H100_GIB * GIB
        result = plan(cfg, model_shapes(cfg), gpu_bytes, args.gpus)
        print(result.table())
        if result.problems:
            raise ConfigError("the memory plan does not fit:\n  " + "\n  ".join(result.problems))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
