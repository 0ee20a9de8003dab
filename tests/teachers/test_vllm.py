"""The vllm backend without vLLM: converting a (fake) prompt_logprobs structure, and the missing-vLLM error."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

from opd_agents.config import TeacherConfig
from teachers.hf import HFTeacher
from teachers.vllm_backend import VLLMTeacher, prompt_logprobs_to_topk


@dataclass
class Logprob:
    """Shape of vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def fake_prompt_logprobs(logp: torch.Tensor, input_ids: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """What vLLM returns for prompt_logprobs=k: None first, then top-k plus the prompt token (with its true rank)."""
    out: list[dict[int, Logprob] | None] = [None]
    for t in range(1, len(input_ids)):
        row = logp[t - 1]
        order = row.argsort(descending=True).tolist()
        entry = {tok: Logprob(row[tok].item(), r + 1) for r, tok in enumerate(order[:k])}
        tok = input_ids[t]
        entry.setdefault(tok, Logprob(row[tok].item(), order.index(tok) + 1))
        out.append(dict(reversed(list(entry.items()))))  # dict order carries no meaning: ranks do
    return out


def test_prompt_logprobs_conversion_matches_hf_backend(tiny_model_dirs, tiny_tokenizer, make_chat_sample):
    sample = make_chat_sample(tiny_tokenizer, [{"role": "user", "content": "Solve 3x + 4 = 19."},
                                               {"role": "assistant", "content": "3x = 15, x = 5. \\boxed{5}"}])
    teacher = HFTeacher("teacher", TeacherConfig(model=str(tiny_model_dirs["teacher"])))
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(torch.tensor([sample.input_ids])).logits[0].float(), dim=-1)
    k = 5
    plp = fake_prompt_logprobs(logp, sample.input_ids, k)
    assert any(len(e) == k + 1 for e in plp[1:])  # some prompt tokens fall outside the top-k
    got = prompt_logprobs_to_topk(plp, sample.input_ids, sample.loss_positions(), k)
    want = teacher.topk([sample], k)[0]
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5, rtol=0)


def test_conversion_errors_are_clear():
    plp = [None, {7: Logprob(-0.1, 1), 3: Logprob(-2.5, 2)}]
    out = prompt_logprobs_to_topk(plp, [0, 3], [1], 2)
    assert out.topk_ids.tolist() == [[7, 3]] and out.sampled_logprobs.tolist() == [-2.5]
    with pytest.raises(ValueError, match="prompt token"):
        prompt_logprobs_to_topk(plp, [0, 9], [1], 2)
    with pytest.raises(ValueError, match="fewer than k=3"):
        prompt_logprobs_to_topk(plp, [0, 3], [1], 3)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install opd-agents\[vllm\] on a CUDA machine"):
        VLLMTeacher("t", TeacherConfig(backend="vllm", model="unused"))
