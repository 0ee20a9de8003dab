"""Splitting a teacher's work into bounded calls: consecutive groups of sequences under a token (and count) cap.

Used where a call's cost must stay bounded and the order must stay as it is: the vLLM teacher's `generate` calls
(their outputs are Python lists per prompt position) and a Ray-actor teacher's calls (each timed by call_timeout_s).
The hf teacher's padded forward batches sort by length instead (`teachers.hf.token_budget_batches`).
"""
from __future__ import annotations

from collections.abc import Sequence


def consecutive_batches(lengths: Sequence[int], max_tokens: int, max_sequences: int | None = None,
                        ) -> list[list[int]]:
    """Consecutive index groups of the sequences with `lengths`: at most `max_tokens` tokens and (when given)
    `max_sequences` sequences each; a sequence longer than `max_tokens` goes alone."""
    batches: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(lengths):
        full = max_sequences is not None and batches and len(batches[-1]) >= max_sequences
        if not batches or full or (batches[-1] and tokens + n > max_tokens):
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += n
    return batches
