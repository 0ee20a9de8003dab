"""A GPU held in Ray's books for the in-process learner (`learner.num_workers: 1` on a CUDA node).

The one-process learner runs in the driver. Ray does not know the driver uses a GPU, so without a reservation it may
give that same GPU to a rollout or teacher actor (vLLM engines then fight the learner for memory). `reserve_driver_gpu`
starts a zero-CPU actor pinned to the driver's node that asks Ray for one GPU and answers which one; the learner uses
that device, and the actor lives as long as the learner (`release`).
"""
from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0, num_gpus=1)
class _GPUHold:
    """Holds one GPU for the driver; answers its Ray GPU id."""

    def gpu_ids(self) -> list[str]:
        return [str(i) for i in ray.get_gpu_ids()]


class GPUHold:
    """One reserved GPU on the driver's node: `device` (as this process names it) until `release()`."""

    def __init__(self, timeout_s: float) -> None:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor: Any = _GPUHold.options(scheduling_strategy=here).remote()
        try:
            (gpu,) = ray.get(self._actor.gpu_ids.remote(), timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnschedulableError):  # busy / no GPU there
            self.release()
            raise RuntimeError(
                f"no free GPU on the driver's node for the in-process learner within learner.timeout_s = "
                f"{timeout_s:g} s (learner.num_workers = 1 trains in the driver). Free one, lower the rollout or "
                "teacher num_gpus, or use learner.num_workers >= 2") from None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = visible.split(",").index(gpu) if visible else int(gpu)
        self.device = f"cuda:{index}"

    def release(self) -> None:
        if self._actor is not None:
            ray.kill(self._actor, no_restart=True)
            self._actor = None
