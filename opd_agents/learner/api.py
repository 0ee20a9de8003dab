"""The one learner interface the trainer sees, and the factory that picks in-process or Ray ranks.

`Learner` (one process) and `LearnerGroup` (N Ray actors in one torch.distributed group) both satisfy `LearnerAPI`,
so the training loop never branches on which one it holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from opd_agents.config import Config
from opd_agents.samples import Sample, TeacherTopK


class LearnerAPI(Protocol):
    """What the trainer calls on a learner. `tokenizer` is the student's (its vocabulary is checked against the
    teachers'); `vocab_size` the student's LM-head rows."""

    tokenizer: Any

    @property
    def vocab_size(self) -> int: ...

    def update(self, samples: list[Sample], teacher: list[TeacherTopK], lr_scale: float = 1.0) -> dict[str, float]:
        """One rollout batch's optimizer step(s); averaged metrics."""

    def student_topk_ids(self, samples: list[Sample], k: int) -> list[torch.Tensor]:
        """The student's top-k ids (N, k) at every loss position of each sample (the `score` teacher query)."""

    def probe_fidelity(self, samples: list[Sample], teacher: list[TeacherTopK], teacher_full: list[TeacherTopK],
                       seed: int) -> dict[str, float]:
        """The signal-fidelity probe (`fidelity.signal_fidelity`) on `samples`: the configured loss's teacher answers
        and the same teacher's full distributions; {} when the samples have no loss position."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Full CPU parameters (HF names) for the rollout workers."""

    def state(self) -> dict[str, Any]:
        """Optimizer, scheduler and counters for a checkpoint."""

    def load_state(self, state: dict[str, Any], folder: str | Path | None = None) -> None:
        """Resume from `state` (and the checkpoint `folder` when ranks wrote sharded optimizer state)."""

    def save_pretrained(self, path: str | Path) -> None:
        """The student as a `from_pretrained` folder."""

    def shutdown(self) -> None:
        """Release actors and resources; idempotent."""


def build_learner(cfg: Config, model_path: str, adapter_path: str | None = None) -> LearnerAPI:
    """`learner.num_workers == 1`: the in-process Learner; more: a LearnerGroup of Ray ranks."""
    if cfg.learner.num_workers == 1:
        from opd_agents.learner.learner import Learner

        if not _driver_needs_gpu(cfg):
            return Learner(cfg, model_path, adapter_path)
        from opd_agents.learner.gpu_hold import GPUHold

        hold = GPUHold(cfg.learner.timeout_s)  # a GPU Ray will give to no actor while the learner uses it
        try:
            return Learner(cfg, model_path, adapter_path, device=hold.device, gpu_hold=hold)
        except BaseException:
            hold.release()
            raise
    from opd_agents.learner.group import LearnerGroup

    return LearnerGroup(cfg, model_path, adapter_path)


def _driver_needs_gpu(cfg: Config) -> bool:
    """The in-process learner will train on CUDA inside a Ray cluster that has GPUs to hand out."""
    import ray

    from opd_agents.devices import pick_device

    return (pick_device(cfg.run.device).type == "cuda" and ray.is_initialized()
            and ray.cluster_resources().get("GPU", 0) > 0)
