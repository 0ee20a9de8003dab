"""Which task(s) each training step trains on.

- `alternating`: one task per step, round-robin in config order (the paper's sequential batching);
- `weighted`: one task per step, drawn with probability proportional to `tasks[].weight`;
- `mixed`: every step holds all tasks, the step's prompts split across tasks in proportion to weight.

One-task steps take `tasks[].prompts_per_step` prompts when set, else `rollout.prompts_per_step`; mixed steps split
`rollout.prompts_per_step`.

The schedule is a pure function of (seed, step), so resuming at step N needs no saved state and replays the
same task sequence an uninterrupted run would see.
"""
from __future__ import annotations

import random

from opd_agents.config import Config


class TaskSchedule:
    def __init__(self, cfg: Config) -> None:
        self.kind = cfg.schedule.kind
        self.names = [t.name for t in cfg.tasks]
        self.weights = [t.weight for t in cfg.tasks]
        self.seed = cfg.run.seed
        self.prompts_per_step = cfg.rollout.prompts_per_step
        self.task_prompts = {t.name: t.prompts_per_step or self.prompts_per_step for t in cfg.tasks}

    def tasks_at(self, step: int) -> dict[str, int]:
        """Task name -> number of prompts at `step` (0-based). Tasks with 0 prompts are omitted."""
        if self.kind == "alternating":
            name = self.names[step % len(self.names)]
            return {name: self.task_prompts[name]}
        if self.kind == "weighted":
            rng = random.Random(f"{self.seed}:{step}")
            name = rng.choices(self.names, weights=self.weights)[0]
            return {name: self.task_prompts[name]}
        return self._split_by_weight()

    def _split_by_weight(self) -> dict[str, int]:
        """Largest-remainder split of prompts_per_step by weight (every task gets at least one prompt)."""
        total = sum(self.weights)
        n = max(self.prompts_per_step, len(self.names))
        exact = [n * w / total for w in self.weights]
        counts = [max(1, int(x)) for x in exact]
        order = sorted(range(len(exact)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
        for i in order[: max(0, n - sum(counts))]:
            counts[i] += 1
        return {name: c for name, c in zip(self.names, counts) if c > 0}
