"""Generated math problems with computed answers and short worked solutions (the embedded default data).

Owns ``generate_problems(n, seed, levels)``; every reference answer is computed, never typed, and every solution
ends in ``\\boxed{answer}``, so ``grade(solution, answer)`` holds by construction (the tests check it). Solutions
are a few short lines in a fixed pattern, learnable by the tiny embedded teacher within ~100-200 tokens:

- level 0: 2-digit addition in a fixed-width column format for the tiny embedded models (every
  problem's solution has the same token layout, e.g. ``9+3+0=12`` then ``5+6+1=12`` then ``\\boxed{122}``: per
  column ``top + bottom + carry-in = (carry-out)(digit)``, answer zero-padded to 3 digits);
  not in the default ``LEVELS`` (ask for it explicitly);
- level 1: 2-digit addition / subtraction, column by column with carries and borrows;
- level 2: 3-digit addition / subtraction, and 2-3 digit times 1 digit, column by column;
- level 3: linear equations ``a x + b = c`` with an integer solution, two steps;
- level 4: fraction arithmetic (``+ - *``) on proper fractions, answer reduced (``\\frac{p}{q}``, or an integer).

Deterministic: the same ``(n, seed, levels)`` gives the same list on every machine (``random.Random(seed)``).
Problems are distinct within one call, so a train/eval split of them cannot leak.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from math import gcd

LEVELS = (1, 2, 3, 4)  # the default levels; level 0 (a format for the tiny embedded models) is opt-in
# The problem spaces are finite (level 1 has ~12k problems): this many duplicates in a row means "exhausted".
_MAX_CONSECUTIVE_DUPLICATES = 2_000


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of ``n``, least significant first, zero-padded to ``width``."""
    return [(n // 10**i) % 10 for i in range(width)]


def _column_add(a: int, b: int) -> list[str]:
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    carry, lines = 0, []
    for i in range(width):
        total = da[i] + db[i] + carry
        terms = f"{da[i]} + {db[i]}" + (f" + {carry}" if carry else "")
        if i == width - 1:
            lines.append(f"{terms} = {total}, write {total}.")
        else:
            carry = total // 10
            lines.append(f"{terms} = {total}, write {total % 10}" + (" carry 1." if carry else "."))
    return lines


def _column_subtract(a: int, b: int) -> list[str]:
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    borrow, lines = 0, []
    for i in range(width):
        top = da[i] - borrow
        shown = f"{da[i]} - 1" if borrow else f"{da[i]}"
        if top < db[i]:
            lines.append(f"{shown} - {db[i]}: borrow, {top + 10} - {db[i]} = {top + 10 - db[i]}.")
            borrow = 1
        else:
            lines.append(f"{shown} - {db[i]} = {top - db[i]}.")
            borrow = 0
    return lines


def _column_multiply(a: int, m: int) -> list[str]:
    width = len(str(a))
    da = _digits(a, width)
    carry, lines = 0, []
    for i in range(width):
        total = da[i] * m + carry
        terms = f"{da[i]} * {m}" + (f" + {carry}" if carry else "")
        if i == width - 1:
            lines.append(f"{terms} = {total}, write {total}.")
        else:
            carry = total // 10
            lines.append(f"{terms} = {total}, write {total % 10}" + (f" carry {carry}." if carry else "."))
    return lines


def _fixed_width_columns(a: int, b: int) -> list[str]:
    """Two lines ``x+y+c=kd``: the column's digits, carry in ``c``, carry out ``k`` and result digit ``d``."""
    da, db = _digits(a, 2), _digits(b, 2)
    carry, lines = 0, []
    for i in range(2):
        total = da[i] + db[i] + carry
        lines.append(f"{da[i]}+{db[i]}+{carry}={total // 10}{total % 10}")
        carry = total // 10
    return lines


def _level0(rng: random.Random) -> tuple[str, str, list[str]]:
    # Addition only: the tiny teacher learns it in ~600 CPU steps; with subtraction too it needs ~3x as many.
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b), _fixed_width_columns(a, b)


def _add_or_subtract(rng: random.Random, low: int, high: int) -> tuple[str, str, list[str]]:
    a, b = rng.randint(low, high), rng.randint(low, high)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b), _column_add(a, b)
    a, b = max(a, b), min(a, b)  # non-negative results keep the borrow pattern uniform
    return f"What is {a} - {b}?", str(a - b), _column_subtract(a, b)


def _level1(rng: random.Random) -> tuple[str, str, list[str]]:
    return _add_or_subtract(rng, 10, 99)


def _level2(rng: random.Random) -> tuple[str, str, list[str]]:
    if rng.random() < 0.5:
        return _add_or_subtract(rng, 100, 999)
    a, m = rng.randint(12, 999), rng.randint(2, 9)
    return f"What is {a} * {m}?", str(a * m), _column_multiply(a, m)


def _signed(term: int) -> str:
    return f"+ {term}" if term >= 0 else f"- {-term}"


def _level3(rng: random.Random) -> tuple[str, str, list[str]]:
    a, x = rng.randint(2, 9), rng.randint(-10, 10)
    b = rng.choice([v for v in range(-20, 21) if v != 0])
    c = a * x + b
    moved = f"{c} - {b}" if b > 0 else f"{c} + {-b}"
    return (
        f"Solve for x: {a}x {_signed(b)} = {c}.",
        str(x),
        [f"{a}x = {moved} = {c - b}.", f"x = {c - b} / {a} = {x}."],
    )


def fraction_tex(value: Fraction) -> str:
    """``value`` in the answer format: an integer, or a reduced ``\\frac{p}{q}`` with a leading minus."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _unreduced_tex(numerator: int, denominator: int) -> str:
    sign = "-" if numerator < 0 else ""
    return f"{sign}\\frac{{{abs(numerator)}}}{{{denominator}}}"


def _reduce_line(numerator: int, denominator: int) -> list[str]:
    divisor = gcd(numerator, denominator)
    if numerator == 0 or divisor == 1:
        return []
    return [f"Divide by {divisor}: {fraction_tex(Fraction(numerator, denominator))}."]


def _level4(rng: random.Random) -> tuple[str, str, list[str]]:
    def proper() -> Fraction:
        denominator = rng.randint(2, 9)
        return Fraction(rng.randint(1, denominator - 1), denominator)

    x, y, op = proper(), proper(), rng.choice("+-*")
    problem = f"What is {fraction_tex(x)} {op} {fraction_tex(y)}?"
    if op == "*":
        numerator, denominator = x.numerator * y.numerator, x.denominator * y.denominator
        lines = [
            f"\\frac{{{x.numerator} * {y.numerator}}}{{{x.denominator} * {y.denominator}}}"
            f" = {_unreduced_tex(numerator, denominator)}."
        ]
        return problem, fraction_tex(x * y), lines + _reduce_line(numerator, denominator)
    common = x.denominator * y.denominator // gcd(x.denominator, y.denominator)
    nx, ny = x.numerator * common // x.denominator, y.numerator * common // y.denominator
    numerator = nx + ny if op == "+" else nx - ny
    lines = [
        f"Common denominator {common}: \\frac{{{nx}}}{{{common}}} {op} \\frac{{{ny}}}{{{common}}}"
        f" = {_unreduced_tex(numerator, common)}."
    ]
    return problem, fraction_tex(Fraction(numerator, common)), lines + _reduce_line(numerator, common)


# A maker draws one problem: (problem text, answer, solution lines without the final box).
_Maker = Callable[[random.Random], tuple[str, str, list[str]]]
_MAKERS: dict[int, _Maker] = {0: _level0, 1: _level1, 2: _level2, 3: _level3, 4: _level4}
# How a level writes the boxed answer: level 0 zero-pads it to 3 digits (``\\boxed{046}``, which grades equal to
# 46) so that every level-0 solution has the same layout; the reference answer stays unpadded.
_BOXED: dict[int, Callable[[str], str]] = {0: lambda answer: answer.zfill(3)}


def generate_problems(n: int, seed: int = 0, levels: Sequence[int] = LEVELS) -> list[dict]:
    """``n`` distinct problems, levels assigned round-robin; dicts with keys problem, answer, solution, level."""
    levels = tuple(levels)
    unknown = [level for level in levels if level not in _MAKERS]
    if unknown or not levels:
        raise ValueError(f"unknown difficulty levels {unknown or list(levels)}; choose from {sorted(_MAKERS)}")
    if n < 0:
        raise ValueError(f"number of problems must be >= 0, got {n}")
    rng = random.Random(seed)
    problems: list[dict] = []
    seen: set[str] = set()
    misses_left = _MAX_CONSECUTIVE_DUPLICATES
    while len(problems) < n:
        if misses_left == 0:
            raise ValueError(
                f"only {len(problems)} distinct problems found at levels {list(levels)}; ask for fewer than {n} "
                "or add higher levels"
            )
        level = levels[len(problems) % len(levels)]
        problem, answer, lines = _MAKERS[level](rng)
        if problem in seen:
            misses_left -= 1
            continue
        misses_left = _MAX_CONSECUTIVE_DUPLICATES
        seen.add(problem)
        boxed = _BOXED.get(level, str)(answer)
        solution = "\n".join(lines + [f"\\boxed{{{boxed}}}"])
        problems.append({"problem": problem, "answer": answer, "solution": solution, "level": level})
    return problems
