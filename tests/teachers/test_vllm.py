"""The vllm backend without vLLM: converting a (fake) prompt_logprobs structure, and the missing-vLLM error."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from opd_agents.config import TeacherConfig
from teachers.batching import consecutive_batches
from teachers.hf import HFTeacher
from teachers.vllm_backend import (
    VLLMTeacher,
    flat_prompt_logprobs_to_topk,
    parse_scores,
    scoring_request,
)


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


def test_consecutive_batches_bound_sequences_and_tokens():
    assert consecutive_batches([5, 5, 5, 5], max_tokens=100, max_sequences=3) == [[0, 1, 2], [3]]
    assert consecutive_batches([40, 40, 30, 200, 10], max_tokens=100, max_sequences=10) == [[0, 1], [2], [3], [4]]
    assert consecutive_batches([40, 40, 30, 200, 10], max_tokens=100) == [[0, 1], [2], [3], [4]]
    assert consecutive_batches([5] * 5, max_tokens=100) == [[0, 1, 2, 3, 4]]  # no count cap
    assert consecutive_batches([], 4, 4) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install opd-agents\[vllm\] on a CUDA machine"):
        VLLMTeacher("t", TeacherConfig(backend="vllm", model="unused"))


def fake_token_id_logprobs(logp: torch.Tensor, rows: np.ndarray, start: int) -> np.ndarray:
    """vLLM's `prompt_token_id_logprobs` as documented (vllm/outputs.py): row i holds the log-probs of its ids as
    predictions of prompt token start + i + 1, i.e. from the logits at position start + i; -1 ids score -inf."""
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    for i, ids in enumerate(rows):
        keep = ids >= 0
        out[i, keep] = logp[start + i, torch.from_numpy(ids[keep])].numpy()
    return out


def test_scoring_request_and_parser_match_the_hf_teachers_scores(tiny_model_dirs, tiny_tokenizer, make_chat_sample):
    # Two assistant turns: the template tokens between them are rows the request pads with -1.
    sample = make_chat_sample(tiny_tokenizer, [{"role": "user", "content": "What is 12 + 35?"},
                                               {"role": "assistant", "content": "It is 47."},
                                               {"role": "user", "content": "And 47 + 1?"},
                                               {"role": "assistant", "content": "\\boxed{48}"}])
    teacher = HFTeacher("teacher", TeacherConfig(model=str(tiny_model_dirs["teacher"])))
    positions = sample.loss_positions()
    ids = torch.randint(0, len(tiny_tokenizer), (len(positions), 4), generator=torch.Generator().manual_seed(0))
    prompt, start, rows = scoring_request(sample.input_ids, positions, ids)
    assert start == positions[0] - 1 and prompt == sample.input_ids[:positions[-1] + 1]
    assert rows.shape == (len(prompt) - 1 - start, 5)  # rows = prompt_len - 1 - start
    for j, p in enumerate(positions):  # row i <-> position start + i + 1
        assert rows[p - 1 - start, 0] == sample.input_ids[p] and rows[p - 1 - start, 1:].tolist() == ids[j].tolist()
    gaps = sorted(set(range(start + 1, positions[-1] + 1)) - set(positions))
    assert gaps and all((rows[p - 1 - start] == -1).all() for p in gaps)
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    got = parse_scores(fake_token_id_logprobs(logp, rows, start), positions, start, ids)
    want = teacher.score([sample], [ids])[0]
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_logprob_token_ids"):
        parse_scores(np.zeros((rows.shape[0], 3), dtype=np.float32), positions, start, ids)


def test_scoring_given_ids_needs_the_v2_runner_which_needs_cuda(monkeypatch):
    cfg = TeacherConfig(backend="vllm", model="x")
    if not torch.cuda.is_available():
        assert "needs CUDA" in VLLMTeacher.score_unavailable(cfg)
        assert VLLMTeacher.score_unavailable(cfg.model_copy(update={"ray_actor": True, "num_gpus": 1.0})) is None
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert "turns off the V2 model runner" in VLLMTeacher.score_unavailable(cfg)
