"""Student rollouts: policies (HF / vLLM), the multi-turn episode loop, samples, and Ray rollout groups.

Data flow: RolloutGroup.rollout(task) → RolloutWorker actors → run_episodes(envs, policy) → Episode
(with its `Sample`s) → RolloutBatch(episodes, metrics). vLLM is imported only when that backend is built.
"""
from opd_agents.rollout.backends import build_policy
from opd_agents.rollout.chat import ChatEncoder, TemplateError
from opd_agents.rollout.episode import Episode, EpisodeSpec, run_episodes
from opd_agents.rollout.group import LocalRolloutGroup, RolloutBatch, RolloutGroup, RolloutWorkerError, init_ray
from opd_agents.rollout.policy import Generation, Policy
from opd_agents.rollout.sampling import SamplingParams, processed_logprobs, sample_step
from opd_agents.rollout.stats import rollout_metrics
from opd_agents.rollout.worker import RolloutWorker, WeightVersionError

__all__ = [
    "ChatEncoder", "Episode", "EpisodeSpec", "Generation", "LocalRolloutGroup", "Policy", "RolloutBatch",
    "RolloutGroup", "RolloutWorker", "RolloutWorkerError", "SamplingParams", "TemplateError", "WeightVersionError",
    "build_policy", "init_ray", "processed_logprobs", "rollout_metrics", "run_episodes", "sample_step",
]
