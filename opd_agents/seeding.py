"""Seeds: one deterministic seed from several integers, and seeding the process's global RNGs (ground floor).

Every random stream of a run derives from `run.seed` through `mix_seed` (a step's rollouts, a worker, a probe), so a
resumed run replays what an uninterrupted one would; `seed_everything` seeds python's, numpy's and torch's global
generators at the start of a run.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from several integers (request seed, chunk, turn, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch's (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
