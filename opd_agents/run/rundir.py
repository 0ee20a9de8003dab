"""The run directory `<output_dir>/<name>/` and atomic file writes.

Layout: config.yaml (resolved), metrics.jsonl, tb/ (TensorBoard), checkpoints/step_<N>/, eval/*.json, plots/*.png.
Everything is written so that a kill at any instant leaves either the old or the new file, never a torn one:
whole files go through a temp file + fsync + `os.replace`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from opd_agents.config import Config, ConfigError, dump_config


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old content or the new, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunDir:
    """Paths of one run; `create` makes the folder and saves the resolved config."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_config(cls, cfg: Config) -> RunDir:
        return cls(Path(cfg.run.output_dir) / cfg.run.name)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb_dir(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def create(self, cfg: Config, *, resume: bool) -> None:
        """Make the run folder. A non-empty existing run needs `resume` (nothing in it is touched otherwise)."""
        has_content = self.root.is_dir() and any(self.root.iterdir())
        if has_content and not resume:
            raise ConfigError(
                f"run directory {str(self.root)!r} already exists; pass --resume to continue it, or choose "
                f"another name (run.name=...) — nothing in it was changed")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, dump_config(cfg))
