"""Student rollouts: policies (HF / vLLM), the multi-turn episode loop, samples, and Ray rollout groups.

Data flow: RolloutGroup.rollout(task) → RolloutWorker actors → run_episodes(envs, policy) → Episode
(with its `Sample`s) → RolloutBatch(episodes, metrics). vLLM is imported only when that backend is built.

Public names are loaded on first access, so `from opd_agents.rollout.hf_policy import HFPolicy` needs neither Ray
nor gymnasium (a GPU box with torch and transformers only runs `benchmarks/gpu_check.py` this way).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_policy": "opd_agents.rollout.backends",
    "ChatEncoder": "opd_agents.rollout.chat",
    "TemplateError": "opd_agents.rollout.chat",
    "Episode": "opd_agents.rollout.episode",
    "EpisodeSpec": "opd_agents.rollout.episode",
    "run_episodes": "opd_agents.rollout.episode",
    "LocalRolloutGroup": "opd_agents.rollout.group",
    "RolloutBatch": "opd_agents.rollout.group",
    "RolloutGroup": "opd_agents.rollout.group",
    "RolloutWorkerError": "opd_agents.rollout.group",
    "Generation": "opd_agents.rollout.policy",
    "Policy": "opd_agents.rollout.policy",
    "SamplingParams": "opd_agents.sampling",
    "processed_logprobs": "opd_agents.sampling",
    "sample_step": "opd_agents.sampling",
    "rollout_metrics": "opd_agents.rollout.stats",
    "RolloutWorker": "opd_agents.rollout.worker",
    "WeightVersionError": "opd_agents.rollout.worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opd_agents.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
