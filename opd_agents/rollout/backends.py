"""The rollout backend factory: `rollout.backend` -> a `Policy` (vLLM is imported only when it is chosen)."""
from __future__ import annotations

from opd_agents.config import ModelConfig, RolloutConfig
from opd_agents.rollout.policy import Policy


def build_policy(model: ModelConfig, rollout: RolloutConfig, tokenizer, *, device: str, seed: int = 0) -> Policy:
    """The backend named by `rollout.backend`, loaded from the model folder `model.path`."""
    if rollout.backend == "hf":
        from opd_agents.rollout.hf_policy import HFPolicy

        return HFPolicy.from_pretrained(model, tokenizer, device=device, seed=seed)
    if rollout.backend == "vllm":
        from opd_agents.rollout.vllm_policy import VLLMPolicy

        return VLLMPolicy.from_config(model, rollout, tokenizer, seed=seed)
    raise ValueError(f"rollout.backend = {rollout.backend!r} is unknown; choose 'hf' or 'vllm'.")
