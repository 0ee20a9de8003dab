"""glibc's mmap threshold (opd_agents/malloc.py): the value applied, its effect on resident memory, and its reach
into Ray workers through `init_ray`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from opd_agents import malloc
from opd_agents.config import RayConfig

glibc_only = pytest.mark.skipif(not malloc.is_glibc(), reason="the threshold is a glibc setting")


def test_threshold_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(malloc.ENV_VAR, raising=False)
    assert malloc.threshold_bytes(None) is None
    assert malloc.threshold_bytes(1024) == 1 << 20
    with pytest.raises(ValueError, match="outside glibc's range"):
        malloc.threshold_bytes(64 * 1024)
    monkeypatch.setenv(malloc.ENV_VAR, "4096")  # the user's own setting wins: nothing is applied
    assert malloc.threshold_bytes(1024) is None
    assert malloc.worker_env(1024) == {}


@glibc_only
def test_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(malloc.ENV_VAR, raising=False)
    assert malloc.worker_env(1024) == {malloc.ENV_VAR: str(1 << 20)}
    assert malloc.worker_env(None) == {}


# Frees a 16 MiB mmapped block (raising glibc's dynamic threshold to 16 MiB), then allocates 8 MiB blocks, touched,
# each followed by a 256 KiB block that stays (untouched, so not resident itself), frees the large ones, and prints
# how much resident memory they left behind.
_FRAGMENT = textwrap.dedent("""
    import ctypes, sys
    from opd_agents import malloc
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    if sys.argv[1] == "pin":
        assert malloc.pin_mmap_threshold(1024)
    big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
    before = rss_mib()
    blocks, keep = [], []
    for _ in range(40):
        b = libc.malloc(8 << 20); ctypes.memset(b, 1, 8 << 20); blocks.append(b)
        keep.append(libc.malloc(256 << 10))
    for b in blocks:
        libc.free(b)
    print(rss_mib() - before)
""")


def _env_without_threshold() -> dict[str, str]:
    """This environment less a user's MALLOC_MMAP_THRESHOLD_, so the child shows glibc's or the pinned behaviour."""
    return {k: v for k, v in os.environ.items() if k != malloc.ENV_VAR}


def _left_behind_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, timeout=60,
                         check=True, env=_env_without_threshold())
    return float(out.stdout.strip())


@glibc_only
def test_pinned_threshold_returns_freed_buffers() -> None:
    """With the threshold pinned, the 320 MiB of freed 8 MiB buffers leave the process; with glibc's dynamic
    threshold they stay resident behind the small blocks (the rollout's growth at V = 152k)."""
    pinned, dynamic = _left_behind_mib("pin"), _left_behind_mib("default")
    assert pinned < 16, pinned
    assert dynamic > 200, dynamic


@glibc_only
def test_init_ray_gives_workers_the_threshold() -> None:
    script = textwrap.dedent("""
        import os, ray
        from opd_agents.config import RayConfig
        from opd_agents.run.cluster import init_ray
        init_ray(RayConfig(num_cpus=1, malloc_mmap_threshold_kib=512))
        print(ray.get(ray.remote(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_")).remote(), timeout=120))
        ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=True,
                         env=_env_without_threshold())
    assert out.stdout.strip().splitlines()[-1] == str(512 * 1024)


def test_config_default_and_bounds() -> None:
    assert RayConfig().malloc_mmap_threshold_kib == 1024
    assert RayConfig(malloc_mmap_threshold_kib=None).malloc_mmap_threshold_kib is None
    with pytest.raises(ValueError):
        RayConfig(malloc_mmap_threshold_kib=33 * 1024)
