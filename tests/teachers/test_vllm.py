"""The vllm backend without vLLM: converting a (fake) prompt_logprobs structure, and the missing-vLLM error."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

from opd_agents.config import TeacherConfig
from teachers.hf import HFTeacher
from teachers.vllm_backend import VLLMTeacher, flat_prompt_logprobs_to_topk, generate_batches


@dataclass
class FlatLogprobs:
    """The fields of vllm.logprobs.FlatLogprobs the conversion reads."""

    start_indices: list[int]
    end_indices: list[int]
    token_ids: list[int]
    logprobs: list[float]


def fake_flat_prompt_logprobs(logp: torch.Tensor, input_ids: list[int], k: int) -> FlatLogprobs:
    """What vLLM 0.32 returns for prompt_logprobs=k, flat_logprobs=True: position 0 empty, then per position the
    prompt token followed by the top-k (`append_logprobs_for_next_position`), the prompt token repeated when it is
    among the top-k."""
    flat = FlatLogprobs([0], [0], [], [])
    for t in range(1, len(input_ids)):
        row = logp[t - 1]
        top = row.argsort(descending=True)[:k].tolist()
        flat.start_indices.append(len(flat.token_ids))
        flat.token_ids += [input_ids[t], *top]
        flat.logprobs += [row[input_ids[t]].item(), *(row[tok].item() for tok in top)]
        flat.end_indices.append(len(flat.token_ids))
    return flat


def test_flat_prompt_logprobs_conversion_matches_hf_backend(tiny_model_dirs, tiny_tokenizer, make_chat_sample):
    sample = make_chat_sample(tiny_tokenizer, [{"role": "user", "content": "Solve 3x + 4 = 19."},
                                               {"role": "assistant", "content": "3x = 15, x = 5. \\boxed{5}"}])
    teacher = HFTeacher("teacher", TeacherConfig(model=str(tiny_model_dirs["teacher"])))
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(torch.tensor([sample.input_ids])).logits[0].float(), dim=-1)
    k = 5
    flat = fake_flat_prompt_logprobs(logp, sample.input_ids, k)
    got = flat_prompt_logprobs_to_topk(flat, sample.input_ids, sample.loss_positions(), k)
    want = teacher.topk([sample], k)[0]
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5, rtol=0)


def test_conversion_errors_are_clear():
    flat = FlatLogprobs([0, 0], [0, 3], [3, 7, 3], [-2.5, -0.1, -2.5])
    out = flat_prompt_logprobs_to_topk(flat, [0, 3], [1], 2)
    assert out.topk_ids.tolist() == [[7, 3]] and out.sampled_logprobs.tolist() == [-2.5]
    with pytest.raises(ValueError, match="not the prompt token 9"):
        flat_prompt_logprobs_to_topk(flat, [0, 9], [1], 2)
    with pytest.raises(ValueError, match="hold 3 entries, not k \\+ 1 = 4"):
        flat_prompt_logprobs_to_topk(flat, [0, 3], [1], 3)


def test_generate_batches_bound_sequences_and_tokens():
    assert generate_batches([5, 5, 5, 5], max_sequences=3, max_tokens=100) == [[0, 1, 2], [3]]
    assert generate_batches([40, 40, 30, 200, 10], max_sequences=10, max_tokens=100) == [[0, 1], [2], [3], [4]]
    assert generate_batches([], 4, 4) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install opd-agents\[vllm\] on a CUDA machine"):
        VLLMTeacher("t", TeacherConfig(backend="vllm", model="unused"))
