"""The in-process learner's GPU reservation in Ray (`learner/gpu_hold.py`), on a CPU cluster: no GPU is a clear error
within the timeout that leaves nothing behind, and a CPU learner reserves nothing."""
from __future__ import annotations

import time

import pytest
import ray

from opd_agents.learner.api import _driver_needs_gpu, build_learner
from opd_agents.learner.gpu_hold import GPUHold
from tests.learner.test_learner import _cfg


def test_no_free_gpu_is_a_clear_error_within_the_timeout(ray_cluster) -> None:
    before = ray.available_resources().get("CPU")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no free GPU on the driver's node.*learner.timeout_s = 2 s"):
        GPUHold(timeout_s=2.0)
    assert time.monotonic() - started < 30
    assert ray.available_resources().get("CPU") == before  # the pending hold actor was killed


def test_a_cpu_learner_reserves_nothing(ray_cluster, tiny_model_dirs) -> None:
    cfg = _cfg(tiny_model_dirs["student"], **{"run.device": "cpu"})
    assert not _driver_needs_gpu(cfg)
    learner = build_learner(cfg, str(tiny_model_dirs["student"]))
    assert learner.gpu_hold is None and learner.device.type == "cpu"
    learner.shutdown()
