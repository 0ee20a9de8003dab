"""How often the math env's grader agrees with the real data: the reference solutions of GSM8K and MATH-500 graded
as the env grades a response, and mismatched (solution, other problem's answer) pairs that it must reject.

    python -m experiments.math_grader [--data ../shared/data/math]

The pipeline is the env's own (``extract_answer`` in the ``"boxed"`` format, then ``check_answer`` with the env's
default timeout). MATH-500: the response is the worked ``solution``, graded against the separate ``answer`` column
(written independently of the solution's last ``\\boxed{}``). GSM8K has no boxed answer: the response is its worked
solution with the ``#### <final>`` line rewritten as ``The answer is $\\boxed{<final>}$`` (separators as the data
writes them), which checks the loader's ``####`` split and separator handling, extraction and math-verify's reading
of "1,080" against "1080". Mismatched pairs: response i against the answer of problem perm[i] (a seeded
permutation; pairs whose answers are equal strings dropped); an equivalent answer written differently counts as a
match, which is the grader being right. Writes ``experiments/results/real_data/math_grader.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from envs.math import check_answer, extract_answer, load_problems

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math"
RESULTS = Path(__file__).resolve().parent / "results" / "real_data" / "math_grader.json"
SEED = 0
GRADING_THREADS = 2  # one per core of the CI machine


def gsm8k_response(problem: dict[str, Any]) -> str:
    """The GSM8K worked solution in the env's answer format: the ``#### <final>`` line as a boxed answer."""
    body, final = problem["solution"].rsplit("####", 1)
    return f"{body.rstrip()}\nThe answer is $\\boxed{{{final.strip()}}}$."


def grade_all(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``check_answer`` statuses of (response, reference) pairs, graded as the env grades a response."""
    with ThreadPoolExecutor(GRADING_THREADS) as pool:
        return list(pool.map(lambda pair: check_answer(extract_answer(pair[0]), pair[1]), pairs))


def mismatched(responses: Sequence[str], answers: Sequence[str]) -> list[tuple[str, str]]:
    """Response i with the answer of problem perm[i] (seeded), keeping pairs whose answers differ."""
    order = list(range(len(answers)))
    random.Random(SEED).shuffle(order)
    return [(responses[i], answers[j]) for i, j in enumerate(order) if j != i and answers[j] != answers[i]]


def agreement(responses: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
    """References graded correct and mismatched pairs accepted, with the cases that went the wrong way."""
    statuses = grade_all(list(zip(responses, answers)))
    pairs = mismatched(responses, answers)
    accepted = [(extract_answer(r), a) for (r, a), s in zip(pairs, grade_all(pairs)) if s == "correct"]
    return {
        "references": len(answers), "references_correct": sum(s == "correct" for s in statuses),
        "mismatched_pairs": len(pairs), "mismatched_accepted": len(accepted),
        "not_correct": [{"answer": a, "status": s, "response_tail": r[-200:]}
                        for r, a, s in zip(responses, answers, statuses) if s != "correct"],
        "accepted": [{"extracted": e, "other_answer": a} for e, a in accepted],
    }


def math500(data: Path) -> dict[str, Any]:
    problems = load_problems(data / "math500_test.jsonl", "math500")
    return agreement([p["solution"] for p in problems], [p["answer"] for p in problems])


def gsm8k(data: Path, name: str, sample: int | None = None) -> dict[str, Any]:
    problems = load_problems(data / name, "gsm8k")
    if sample is not None:
        problems = random.Random(SEED).sample(problems, sample)
    return agreement([gsm8k_response(p) for p in problems], [p["answer"] for p in problems])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the GSM8K and MATH-500 jsonl")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = {"MATH-500": math500(args.data), "GSM8K test": gsm8k(args.data, "gsm8k_test.jsonl"),
              "GSM8K train": gsm8k(args.data, "gsm8k_train.jsonl")}
    print(f"{'data':12} {'references correct':>20} {'mismatched accepted':>20}")
    for name, row in result.items():
        print(f"{name:12} {row['references_correct']:>9}/{row['references']:<10} "
              f"{row['mismatched_accepted']:>9}/{row['mismatched_pairs']:<10}")
    result["wall_s"] = time.perf_counter() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
