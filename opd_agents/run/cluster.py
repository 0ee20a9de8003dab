"""The Ray cluster a run uses: connect to one, or start a local one, with the process-wide settings every worker needs.

Rollout groups, teacher actors and learner ranks expect Ray to be initialised already (they raise a clear error
otherwise); the entry points call `init_ray(cfg.ray)` once, before building any of them.
"""
from __future__ import annotations

import ray

from opd_agents import malloc
from opd_agents.config import RayConfig


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
    env_vars = malloc.worker_env(cfg.malloc_mmap_threshold_kib)
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=runtime_env)
