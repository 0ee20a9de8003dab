"""transformers' "Loading weights" / "Writing model shards" progress bars, shown only where a person waits on them.

A tiny model loads in milliseconds and the main job loads seven of them (learner, teachers, rollout workers), so the
bars are only noise there; a multi-GB checkpoint's bar is worth showing. `load_progress(folder)` turns the bar off
while a local checkpoint under `QUIET_BELOW_BYTES` loads (a hub id, or a bigger folder, keeps transformers' default)
and restores the previous setting after. Ray workers start with the bar off altogether (`run/cluster.py`), so N
rollout workers never print N bars into the driver's log. Checkpoint saves run with the bars off (`no_progress_bars`):
they are routine, and the training bar already shows the run moving.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging as hf_logging

QUIET_BELOW_BYTES = 1 << 30  # 1 GiB: loads in about a second from a local disk


def weight_bytes(folder: str | Path) -> int | None:
    """Total size of the weight files (`*.safetensors`, `*.bin`) of a local model folder; None for anything else."""
    path = Path(folder)
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern) if p.is_file())


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """The block runs with transformers' progress bars off (restored after, if they were on)."""
    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def load_progress(folder: str | Path) -> Iterator[None]:
    """The block loads `folder`'s weights with transformers' progress bar off when the checkpoint is small."""
    size = weight_bytes(folder)
    if size is None or size >= QUIET_BELOW_BYTES:
        yield
        return
    with no_progress_bars():
        yield
