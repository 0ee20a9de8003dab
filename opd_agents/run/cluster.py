"""The Ray cluster a run uses: connect to one, or start a local one, with the process-wide settings every worker needs.

Rollout groups, teacher actors and learner ranks expect Ray to be initialised already (they raise a clear error
otherwise); the entry points call `init_ray(cfg.ray)` once, before building any of them. `ray.init(address)` waits
for a cluster that does not answer for minutes, so `check_address` first opens a TCP connection to the address within
`ray.connect_timeout_s` (preflight calls it too, before anything is written); a host that answers but is no Ray
cluster is then Ray's own error.
"""
from __future__ import annotations

import os
import re
import socket

import ray

from opd_agents import malloc
from opd_agents.config import ConfigError, RayConfig

_HOST_PORT = re.compile(r"^(?:ray://)?\[?([^\[\]/]+?)\]?:(\d{1,5})/?$")


def check_address(cfg: RayConfig) -> None:
    """ConfigError unless `cfg.address` (`host:port` or `ray://host:port`) accepts a TCP connection within
    `cfg.connect_timeout_s`; `auto` and `local` are left to Ray."""
    if cfg.address is None or cfg.address in ("auto", "local"):
        return
    found = _HOST_PORT.match(cfg.address.strip())
    if found is None or not 0 < int(found.group(2)) < 65536:
        raise ConfigError(f"ray.address = {cfg.address[:200]!r} is not host:port or ray://host:port (or auto); "
                          "e.g. ray.address=10.0.0.5:6379")
    host, port = found.group(1), int(found.group(2))
    try:
        with socket.create_connection((host, port), timeout=cfg.connect_timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"ray.address = {cfg.address[:200]!r}: nothing answers there within "
                          f"{cfg.connect_timeout_s:g} s ({exc.strerror or type(exc).__name__}); start the cluster "
                          "(ray start --head) or fix the address, or raise ray.connect_timeout_s") from None


def quiet_worker_env() -> dict[str, str]:
    """Progress bars off in Ray workers: every rollout worker and teacher actor loading its model would print
    transformers' "Loading weights" bar into the driver's log (and Ray's dedup notice after them); warnings and
    errors still come through. A user who sets HF_HUB_DISABLE_PROGRESS_BARS keeps their own choice."""
    return {} if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ else {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def init_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start a local cluster with `cfg.num_cpus` CPUs (no dashboard). Also fixes glibc's
    mmap threshold (`cfg.malloc_mmap_threshold_kib`, opd_agents/malloc.py) in this process and, through the job's
    runtime environment, in every worker process of the job.

    A local cluster requires Ray's auth token from every client (Ray >= 2.59 starts local clusters in token mode and
    keeps the token in ~/.ray/auth_token; tests/run/test_reliability_exposure.py checks a client without it is
    refused). That token is the protection: Ray's servers listen on every interface whatever node address they
    register under. A remote cluster's auth is its own setting (`RAY_AUTH_MODE=token` on every node)."""
    if ray.is_initialized():
        return
    malloc.pin_mmap_threshold(cfg.malloc_mmap_threshold_kib)
    env_vars = malloc.worker_env(cfg.malloc_mmap_threshold_kib) | quiet_worker_env()
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if cfg.address:
        check_address(cfg)
        ray.init(address=cfg.address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=runtime_env)
