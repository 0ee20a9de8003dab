"""glibc malloc's mmap threshold: why a process's memory climbs during generation, and the setting that stops it.

glibc serves a request of at least `M_MMAP_THRESHOLD` bytes with its own `mmap`, returned to the system on free; smaller
ones come from the heap, whose freed space stays resident until the heap's top is free. By default the threshold is
dynamic: each freed mmapped block raises it to that block's size (up to 32 MiB). After the first (rows, V) logits
chunk of a teacher or learner is freed, the sampler's per-token (B, V) buffers (5–10 MB at V = 152k) come from the
heap, interleave with the KV cache's small allocations, and the heap cannot shrink: in one measured step at
V = 152,064 the rollout's resident memory rose from 0.96 to 1.8 GiB, on some runs and not others
(benchmarks/trl_step.py). A fixed threshold (setting it turns the dynamic raise off) sends every buffer of at least
that size to mmap, so freed logits leave at once; the cost is a page fault per 4 KiB page on each such allocation.

`ray.malloc_mmap_threshold_kib`, applied by `init_ray`, sets it in the driver (`pin_mmap_threshold`, through
`mallopt`) and, through the Ray job's environment (`worker_env`: glibc reads `MALLOC_MMAP_THRESHOLD_` at process
start), in every Ray worker. A `MALLOC_MMAP_THRESHOLD_` already in the environment wins. Elsewhere than glibc both
are no-ops.
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV_VAR = "MALLOC_MMAP_THRESHOLD_"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MAX_KIB = 32 * 1024  # glibc caps the threshold at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def threshold_bytes(kib: int | None) -> int | None:
    """The threshold to apply, in bytes: None where glibc's default stays (kib None, or set by the environment)."""
    if kib is None or ENV_VAR in os.environ:
        return None
    if not 0 <= kib <= _MAX_KIB:
        raise ValueError(f"malloc mmap threshold {kib} KiB is outside glibc's range 0..{_MAX_KIB} KiB")
    return kib * 1024


def pin_mmap_threshold(kib: int | None) -> bool:
    """Fix this process's mmap threshold at `kib` KiB (turning glibc's dynamic raise off); True if it was set."""
    nbytes = threshold_bytes(kib)
    if nbytes is None or not is_glibc():
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, nbytes))


def worker_env(kib: int | None) -> dict[str, str]:
    """Environment variables that give child processes (Ray workers) the same threshold from their start."""
    nbytes = threshold_bytes(kib)
    return {} if nbytes is None or not is_glibc() else {ENV_VAR: str(nbytes)}
