"""The vLLM policy's translation layer, against a stand-in `vllm` module (runs without vLLM; the same paths against
real vLLM are in test_vllm_real.py)."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from opd_agents.config import ModelConfig, RolloutConfig
from opd_agents.rollout import SamplingParams, build_policy
from opd_agents.rollout.vllm_policy import WORKER_EXTENSION, seed32, transfer_backend


@dataclass
class _Logprob:
    logprob: float


class _FakeLLM:
    """Records what the policy asks of vllm.LLM and answers like vLLM's RequestOutput."""

    def __init__(self, **engine_args):
        self.engine_args, self.params = engine_args, []
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=4096))

    def generate(self, prompts, params, use_tqdm=True):
        self.params = params
        outs = []
        for i in range(len(prompts)):
            ids = [7, 8, 2] if i % 2 == 0 else [7, 8, 9]  # even: stopped at eos (2); odd: cut at max_tokens
            lps = [{t: _Logprob(-0.5 * (j + 1))} for j, t in enumerate(ids)]
            reason = "stop" if i % 2 == 0 else "length"
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, logprobs=lps,
                                                                             finish_reason=reason)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: kw
    module.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_policy_maps_params_and_outputs_and_names_its_transfer_engine(fake_vllm, tiny_model_dirs,
                                                                            tiny_tokenizer):
    rollout = RolloutConfig(backend="vllm", vllm={"gpu_memory_utilization": 0.5})
    policy = build_policy(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, tiny_tokenizer, device="cuda")
    llm = policy.llm
    assert llm.engine_args["logprobs_mode"] == "processed_logprobs" and llm.engine_args["gpu_memory_utilization"] == 0.5
    # No GPU here: the weights travel by the gloo engine, registered by the worker extension's module.
    assert llm.engine_args["weight_transfer_config"] == {"backend": "gloo"} and policy.weight_transfer == "gloo"
    assert llm.engine_args["worker_extension_cls"] == WORKER_EXTENSION
    assert llm.engine_args["dtype"] in ("float32", "bfloat16") and llm.engine_args["seed"] == 0
    assert policy.max_model_len == 4096

    gens = policy.generate([[1, 2], [1, 3]], SamplingParams(top_p=0.9, top_k=5, max_new_tokens=3, seed=11))
    assert [g.finish_reason for g in gens] == ["stop", "length"]
    assert gens[0].token_ids == [7, 8, 2] and gens[0].logprobs == [-0.5, -1.0, -1.5]
    p0, p1 = llm.params
    assert p0["top_p"] == 0.9 and p0["top_k"] == 5 and p0["max_tokens"] == 3 and p0["logprobs"] == 0
    assert p0["stop_token_ids"] == [tiny_tokenizer.eos_token_id] and p0["seed"] != p1["seed"]
    assert all(0 <= p["seed"] < 2**32 for p in (p0, p1))

    greedy = policy.generate([[1, 2]], SamplingParams(greedy=True, max_new_tokens=3))
    assert llm.params[0]["temperature"] == 0.0 and greedy[0].logprobs == [0.0] * 3


def test_seeds_fit_in_32_bits():
    assert seed32(2**63 - 1) == 2**32 - 1 and seed32(5) == 5 and seed32(2**32 + 7) == 7


def test_vllm_logprobs_mode_cannot_be_overridden(fake_vllm, tiny_model_dirs, tiny_tokenizer):
    rollout = RolloutConfig(backend="vllm", vllm={"logprobs_mode": "raw_logprobs"})
    with pytest.raises(ValueError, match="processed_logprobs"):
        build_policy(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, tiny_tokenizer, device="cuda")


@pytest.mark.parametrize("key", ["weight_transfer_config", "worker_extension_cls"])
def test_the_weight_sync_owns_its_engine_arguments(fake_vllm, tiny_model_dirs, tiny_tokenizer, key):
    rollout = RolloutConfig(backend="vllm", vllm={key: {"backend": "nccl"}})
    with pytest.raises(ValueError, match="rollout.weight_transfer"):
        build_policy(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, tiny_tokenizer, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU rules")
def test_transfer_backend_without_a_gpu_in_the_sending_process():
    assert transfer_backend("auto", engines_on_cuda=False) == "gloo"
    assert transfer_backend("auto", engines_on_cuda=True) == "gloo"  # nccl would send from this process's GPU
    assert transfer_backend("gloo", engines_on_cuda=True) == "gloo"
    with pytest.raises(ValueError, match="rollout.weight_transfer=gloo"):
        transfer_backend("nccl", engines_on_cuda=True)


def test_an_aborted_request_is_an_error_not_a_truncation(fake_vllm, tiny_model_dirs, tiny_tokenizer):
    policy = build_policy(ModelConfig(path=str(tiny_model_dirs["student"])), RolloutConfig(backend="vllm"),
                          tiny_tokenizer, device="cuda")
    out = types.SimpleNamespace(token_ids=[7], logprobs=[{7: _Logprob(-1.0)}], finish_reason="abort")
    policy.llm.generate = lambda *a, **k: [types.SimpleNamespace(outputs=[out])]
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        policy.generate([[1, 2]], SamplingParams(max_new_tokens=3))
