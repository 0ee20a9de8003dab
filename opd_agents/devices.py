"""Device and dtype choice for every model the framework loads (learner, rollout policies, teachers).

One rule everywhere: CUDA when it is asked for (or `auto` and one is visible), else CPU; dtype `auto` = bfloat16 on
CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy). Also the CPU's name, which the zoo build and the
benchmarks record with their numbers. Ground floor: imports nothing of the framework, and nothing heavier than torch
(the GPU check runs without Ray).
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def pick_device(choice: str | None = "auto") -> torch.device:
    """`cuda` / `cpu` as asked; `auto` or None = CUDA when one is visible, else CPU. Also takes `cuda:1` etc."""
    if choice in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def worker_device(num_gpus: float) -> torch.device:
    """A Ray actor's device: CUDA when it was given a GPU share and one is visible, else CPU."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 on CPU; else the named torch dtype (`float32`, `bfloat16`, `float16`)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform.processor()` says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")) or platform.processor()
    except (OSError, StopIteration):
        return platform.processor()
