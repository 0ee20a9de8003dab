"""One `log_metrics(dict, step)` for every sink: metrics.jsonl, TensorBoard, optional Weights & Biases.

metrics.jsonl is append-only, one JSON object per line, flushed and fsynced per record. On resume,
`MetricsLogger` first truncates the file to the last complete line and drops records at or after the
resumed step, so a killed run leaves no torn line and no duplicated step.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from envs.user_files import MIB, iter_jsonl, size_limit
from opd_agents.config import LoggingConfig
from opd_agents.run.rundir import atomic_write_text

METRICS_MAX_BYTES = 1024 * MIB


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf become strings (JSON has no literal for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def repair_jsonl(path: Path, keep_before_step: int | None = None) -> list[dict[str, Any]]:
    """Drop a torn last line and records with step >= keep_before_step; rewrite atomically; return records."""
    if not path.exists() and not path.is_symlink():
        return []
    records = [r for r in read_metrics(path)
               if keep_before_step is None or not isinstance(r.get("step"), int) or r["step"] < keep_before_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record (JSON object) of a metrics.jsonl, read through `envs.user_files` (a regular file of at most
    `METRICS_MAX_BYTES`; a FIFO, folder or device is a `UserFileError`). A line that is not a JSON object — the torn
    last line of a killed run, or damage anywhere — is skipped with a warning; the records after it are kept."""
    if not path.exists() and not path.is_symlink():
        return []
    out, bad = [], []
    for number, record in iter_jsonl(path, size_limit(METRICS_MAX_BYTES), "metrics file", strict=False):
        if isinstance(record, dict):
            out.append(record)
        else:
            bad.append(number)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} line(s) that are not JSON objects (lines {bad[:5]}"
                      f"{'...' if len(bad) > 5 else ''})", stacklevel=2)
    return out


class MetricsLogger:
    """Fan-out of scalar metrics to jsonl + TensorBoard (+ W&B when configured)."""

    def __init__(self, run_root: Path, cfg: LoggingConfig, *, run_name: str, config_dict: dict[str, Any],
                 resume_step: int | None = None) -> None:
        self.path = run_root / "metrics.jsonl"
        repair_jsonl(self.path, keep_before_step=resume_step)
        self._fh = open(self.path, "a")
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_root / "tb"), purge_step=resume_step)
        self._wandb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("logging.wandb is true but wandb is not installed: "
                                   "pip install opd-agents[wandb]") from exc
            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, config=config_dict, resume="allow")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
