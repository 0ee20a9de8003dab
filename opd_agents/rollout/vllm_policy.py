"""The vLLM policy (GPU): batched sampling through `vllm.LLM` and in-place weight updates.

vLLM is imported lazily (only when this backend is built), so the package imports without it.
Behaviour log-probs: the engine is created with `logprobs_mode="processed_logprobs"`, so the log-prob
vLLM reports for a sampled token is taken after temperature scaling and top-k/top-p masking, i.e. under
the truncated, renormalised distribution it was drawn from (the same convention as sampling.py).
`SamplingParams(logprobs=0)` returns just the sampled token's entry. Stop tokens (end-of-turn ids) are
kept in `token_ids`, as in the HF backend.

Weight sync follows vLLM's RLHF examples: a worker extension class (`worker_extension_cls`) adds a method
to every vLLM worker, invoked with `llm.collective_rpc`, which calls the model's own
`load_weights([(hf_name, tensor), ...])` (this handles fused/sharded parameters from HF names).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from opd_agents.config import ModelConfig, RolloutConfig, model_folder
from opd_agents.rollout.loading import stop_token_ids
from opd_agents.rollout.policy import Generation, Policy
from opd_agents.rollout.sampling import SamplingParams, mix_seed


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "rollout.backend = 'vllm' needs vLLM on a CUDA machine: pip install -e .[vllm]; "
            "or set rollout.backend=hf to generate with transformers.") from exc
    return vllm


class WeightSyncExtension:
    """Mixed into each vLLM worker (named by `worker_extension_cls`); `self.model_runner` is the worker's."""

    def load_hf_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]


class VLLMPolicy(Policy):
    """A `vllm.LLM` engine used as the rollout policy."""

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase) -> None:
        self.llm = llm
        self.vllm = import_vllm()
        self.stop_ids = stop_token_ids(tokenizer)
        self.version = 0

    @classmethod
    def from_config(cls, model: ModelConfig, rollout: RolloutConfig, tokenizer: PreTrainedTokenizerBase,
                    *, seed: int = 0) -> VLLMPolicy:
        # vLLM's FlashInfer sampler cannot return processed log-probs (it asserts); use its PyTorch sampler.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        vllm = import_vllm()
        engine_args: dict[str, Any] = {
            "model": model_folder(model.path, "student.path"),
            "dtype": model.dtype,
            "trust_remote_code": model.trust_remote_code,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": f"{__name__}.WeightSyncExtension",
            **rollout.vllm,
        }
        if engine_args["logprobs_mode"] != "processed_logprobs":
            raise ValueError("rollout.vllm.logprobs_mode must stay 'processed_logprobs': behaviour log-probs "
                             "have to be those of the truncated distribution the tokens were sampled from.")
        return cls(vllm.LLM(**engine_args), tokenizer)

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def load_state_dict(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.llm.collective_rpc("load_hf_weights", args=(list(state.items()),))
        # Cached prefixes hold KV computed with the old weights.
        self.llm.reset_prefix_cache()
        self.version = version

    def _params(self, params: SamplingParams, index: int) -> Any:
        # Distinct per-request seeds: G copies of one prompt must not draw the same stream.
        seed = None if params.seed is None else mix_seed(params.seed, index)
        return self.vllm.SamplingParams(
            n=1,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy else params.top_k,
            max_tokens=params.max_new_tokens,
            logprobs=0,
            stop_token_ids=self.stop_ids,
            seed=seed,
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        inputs = [self.vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(inputs, [self._params(params, i) for i in range(len(prompts))], use_tqdm=False)
        gens = []
        for out in outputs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            lps = [0.0] * len(ids) if params.greedy else [float(d[t].logprob) for t, d in zip(ids, o.logprobs)]
            reason = "stop" if ids and ids[-1] in self.stop_ids else "length"
            gens.append(Generation(ids, lps, reason))
        return gens
