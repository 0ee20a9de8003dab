"""Is a zoo SFT run the same run when repeated? `python -m experiments.zoo_determinism [options]`.

    python -m experiments.zoo_determinism [--model math-teacher] [--steps 200] [--out FILE]

Trains one zoo recipe model (its size, seed, data mix and SFT settings; ``--steps`` instead of its step count) from
the built default zoo's tokenizer several times: twice with 1 torch thread (same machine, same threads), once with 2
threads, and once under build seed 1 (another init and batch order: the spread a float perturbation can grow into).
Reports, per variant, the weights' sha256, the largest weight difference from the first run, the last losses and
the held-out math success (the build's own scoring). Writes JSON (default
`experiments/results/zoo_builds/determinism.json`).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from opd_agents.run.rundir import atomic_write_json
from opd_agents.zoo import demos
from opd_agents.zoo.build import DEFAULT_RECIPE, _select, machine, with_build_seed
from opd_agents.zoo.models import build_tiny_model
from opd_agents.zoo.resolve import zoo_dir
from opd_agents.zoo.scoring import evaluate_math
from opd_agents.zoo.sft import tokenize_pair, train_sft


def train_variant(name: str, steps: int, threads: int, build_seed: int, tokenizer: Any,
                  pairs: dict[str, list[Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    recipe = with_build_seed(DEFAULT_RECIPE, build_seed)
    spec = recipe.models[name]
    sft = replace(spec.sft, max_steps=steps, warmup_steps=min(spec.sft.warmup_steps, steps))
    examples = [tokenize_pair(tokenizer, pair, spec.end_token,
                              prompt_loss=spec.prompt_loss_tasks is None or task in spec.prompt_loss_tasks)
                for task, pair in _select(pairs, {"math": spec.mix.get("math", 0.0)}, spec.seed)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_tiny_model(tokenizer, spec.size, seed=spec.seed)
        result = train_sft(model, tokenizer, examples, sft)
        success = evaluate_math(model, tokenizer, recipe.math_env, recipe.eval_math_problems, recipe.eval_batch)
    finally:
        torch.set_num_threads(saved)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    return weights, {"threads": threads, "build_seed": build_seed, "steps": result.steps,
                     "last_losses": [round(x, 6) for x in result.losses[-3:]], "weights_sha256": digest,
                     "math_success": success, "seconds": round(result.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.zoo_determinism", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="math-teacher", choices=["math-teacher", "student"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/zoo_builds/determinism.json"))
    args = parser.parse_args(argv)
    folder = zoo_dir() / "tokenizer"
    if not folder.is_dir():
        raise SystemExit(f"no built zoo tokenizer at {folder}: run `python -m opd_agents.zoo build` first")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Math pairs only (the ALFWorld demonstrations take minutes to play): the question is the SFT loop's arithmetic.
    pairs = {"math": demos.math_pairs(DEFAULT_RECIPE.math_env)}
    variants = [("1 thread", 1, 0), ("1 thread, again", 1, 0), ("2 threads", 2, 0), ("build seed 1", 1, 1)]
    first: dict[str, torch.Tensor] | None = None
    rows = []
    for label, threads, build_seed in variants:
        weights, row = train_variant(args.model, args.steps, threads, build_seed, tokenizer, pairs)
        first = first or weights
        row["max_abs_weight_diff_vs_first"] = max((weights[k] - first[k]).abs().max().item() for k in weights)
        rows.append({"variant": label} | row)
        print(f"{label:<18} sha256 {row['weights_sha256'][:12]}  max |dw| {row['max_abs_weight_diff_vs_first']:.3g}"
              f"  math {100 * row['math_success']:.1f}%  ({row['seconds']} s)", flush=True)
    atomic_write_json(args.out, {"model": args.model, "steps": args.steps, "machine": machine(None),
                                 "variants": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
