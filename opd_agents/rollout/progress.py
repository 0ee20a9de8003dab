"""Live counts of a rollout call's finished episodes, for a caller that reports progress (a long evaluation).

Workers count each episode as it ends (`EpisodeCounter.add`); a `RolloutGroup` keeps the counter in one small Ray
actor (no CPU reserved; started on the first call that reports, reset for each) that it polls while it waits for the
workers' shares, a `LocalRolloutGroup` in-process. Counting
never changes which episodes run or how: the call's concurrency and results are those of a call without it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opd_agents.rollout.episode import Episode

# (episodes finished so far, of which successes): called by the group whenever it learns new counts.
ProgressFn = Callable[[int, int], None]
POLL_S = 5.0  # how often a RolloutGroup reads the counter while its workers run
READ_TIMEOUT_S = 5.0  # a read that takes longer is skipped: progress is never worth delaying a call


class EpisodeCounter:
    """Finished episodes and successes of one call (a re-run share after a worker restart counts again)."""

    def __init__(self) -> None:
        self.done = 0
        self.successes = 0

    def reset(self) -> None:
        self.done = self.successes = 0

    def add(self, success: bool) -> None:
        self.done += 1
        self.successes += int(success)

    def snapshot(self) -> tuple[int, int]:
        return self.done, self.successes


def episode_hook(counter: Any) -> Callable[[Episode], None] | None:
    """What a worker calls on each finished episode: `counter.add` (in-process), `counter.add.remote` (a Ray actor
    handle: fire and forget), or nothing without a counter."""
    if counter is None:
        return None
    add = counter.add
    if hasattr(add, "remote"):
        return lambda ep: add.remote(ep.success)
    return lambda ep: add(ep.success)
