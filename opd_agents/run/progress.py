"""A rich progress display for the training loop: step, current task, rollout success, loss."""
from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from opd_agents.config import Config


class Progress:
    """Context manager; a no-op when `logging.progress` is false (e.g. CI logs)."""

    def __init__(self, cfg: Config, start: int) -> None:
        self.enabled = cfg.logging.progress
        self.total = cfg.run.steps
        self.start = start
        self._bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self._bar.start()
            self._id = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        task = metrics.get("task", "")
        success = metrics.get(f"{task}/rollout/success_rate")
        info = f"task={task} loss={metrics.get('train/loss', float('nan')):.4f}"
        if success is not None:
            info += f" success={success:.2f}"
        self._bar.update(self._id, completed=step, info=info)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
