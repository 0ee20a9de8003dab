"""Atomic, resumable checkpoints: `checkpoints/step_<N>/` = student (save_pretrained) + trainer_state.pt.

A checkpoint is assembled in a hidden temp folder, fsynced, marked complete with a `COMPLETE` file written
last, then renamed into place — a rename is atomic, so a kill at any instant leaves either no `step_<N>` or a
complete one. `latest_checkpoint` only ever returns folders with the marker; leftover temp folders from a
killed write are removed. trainer_state.pt holds optimizer, LR scheduler, RNG states, step and weight version.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, save_model: Callable[[Path], None], state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write `ckpt_dir/step_<step>` atomically and prune to the newest `keep_last` complete checkpoints.

    `save_model(folder)` writes the student there (save_pretrained weights + tokenizer)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / _MARKER).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. after resume) replaces it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(ckpt_dir)
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written temp folders are deleted."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        if path.name.startswith(".step_") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
            continue
        m = _STEP_DIR.match(path.name)
        if m and (path / _MARKER).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples; the file is our own, written by save_checkpoint.
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
