"""Success reporting for ALFWorld episodes: overall and per task type (the paper reports ALFWorld success rate)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from envs.alfworld.catalog import TASK_TYPES


def success_by_task_type(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mean success per task type plus ``"all"``, from episode results carrying ``task_type`` and ``success``.

    ``success`` may be a bool or a number (``won`` is accepted too). Task types without episodes are left out,
    so a filtered evaluation does not report zeros for types it never ran; the order follows ALFWorld's task ids.
    """
    totals: dict[str, list[float]] = defaultdict(list)
    for result in results:
        if "task_type" not in result:
            raise KeyError(f"episode result without 'task_type': {dict(result)!r}")
        success = result.get("success", result.get("won"))
        if success is None:
            raise KeyError(f"episode result without 'success' (or 'won'): {dict(result)!r}")
        totals[str(result["task_type"])].append(float(success))
    order = [t for t in TASK_TYPES if t in totals] + sorted(t for t in totals if t not in TASK_TYPES)
    report = {t: sum(totals[t]) / len(totals[t]) for t in order}
    every = [s for t in order for s in totals[t]]
    if every:
        report["all"] = sum(every) / len(every)
    return report
