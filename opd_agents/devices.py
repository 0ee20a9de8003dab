"""Device and dtype choice for every model the framework loads (learner, rollout policies, teachers).

One rule everywhere: CUDA when it is asked for (or `auto` and one is visible), else CPU; dtype `auto` = bfloat16 on
CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy). Ground floor: imports nothing of the framework.
"""
from __future__ import annotations

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
