"""The hf teacher backend against a naive full-logits reference on the tiny teacher model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_agents.config import TeacherConfig
from teachers.hf import HFTeacher, logsumexp_, token_budget_batches, topk_from_hidden

CONVERSATIONS = [
    [{"role": "system", "content": "You are a careful solver."},
     {"role": "user", "content": "What is 12 + 35? Put your final answer within \\boxed{}."},
     {"role": "assistant", "content": "12 + 35 = 47. The answer is \\boxed{47}."}],
    [{"role": "user", "content": "Your task is to: put a clean apple in fridge."},
     {"role": "assistant", "content": "<think>I need the apple.</think><action>go to countertop 1</action>"},
     {"role": "user", "content": "You arrive at countertop 1. On the countertop 1, you see a apple 1."},
     {"role": "assistant", "content": "<action>take apple 1 from countertop 1</action>"}],
    [{"role": "user", "content": "Solve 3x + 4 = 19."},
     {"role": "assistant", "content": "x = 5"}],
]
K = 8


@pytest.fixture(scope="module")
def samples(tiny_tokenizer, make_chat_sample):
    return [make_chat_sample(tiny_tokenizer, m, task="math") for m in CONVERSATIONS]


@pytest.fixture(scope="module")
def reference_model(tiny_model_dirs):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"], dtype=torch.float32).eval()


def make_teacher(path, **overrides) -> HFTeacher:
    return HFTeacher("teacher", TeacherConfig(model=str(path), **overrides))


def naive_topk(model, sample, k):
    """Full [T, V] logits of the whole sequence, log_softmax, rows t-1 of the loss positions."""
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.tensor(sample.loss_positions())
    rows = logp[pos - 1]
    vals, ids = rows.topk(k, dim=-1)
    sampled = rows.gather(-1, torch.tensor(sample.input_ids)[pos, None]).squeeze(-1)
    return ids, vals, sampled


def test_topk_matches_naive_full_logits(tiny_model_dirs, samples, reference_model):
    teacher = make_teacher(tiny_model_dirs["teacher"])
    for sample, got in zip(samples, teacher.topk(samples, K)):
        ids, vals, sampled = naive_topk(reference_model, sample, K)
        assert got.topk_ids.dtype == torch.int64 and got.topk_logprobs.dtype == torch.float32
        assert got.topk_ids.shape == (sample.num_loss_tokens, K)
        assert torch.equal(got.topk_ids, ids)
        torch.testing.assert_close(got.topk_logprobs, vals, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.sampled_logprobs, sampled, atol=1e-5, rtol=0)


def test_chunked_equals_unchunked(tiny_model_dirs, samples):
    small = make_teacher(tiny_model_dirs["teacher"], chunk_size=3).topk(samples, K)
    whole = make_teacher(tiny_model_dirs["teacher"], chunk_size=10_000).topk(samples, K)
    for a, b in zip(small, whole):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.sampled_logprobs, b.sampled_logprobs, atol=1e-6, rtol=0)


def test_token_budget_batching_equals_one_at_a_time(tiny_model_dirs, samples):
    longest = max(len(s.input_ids) for s in samples)
    batched = make_teacher(tiny_model_dirs["teacher"], token_budget=10 * longest)
    assert len(token_budget_batches([len(s.input_ids) for s in samples], 10 * longest)) == 1
    together = batched.topk(samples, K)
    alone = [batched.topk([s], K)[0] for s in samples]
    for a, b in zip(together, alone):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.sampled_logprobs, b.sampled_logprobs, atol=1e-5, rtol=0)


def test_token_budget_batches_respect_budget_and_cover_all():
    lengths = [5, 30, 12, 12, 7, 40]
    batches = token_budget_batches(lengths, budget=40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40


def test_sample_without_loss_positions_and_vocab(tiny_model_dirs, tiny_tokenizer, samples):
    teacher = make_teacher(tiny_model_dirs["teacher"])
    empty = type(samples[0])(input_ids=[1, 2, 3], loss_mask=[0, 0, 0], behaviour_logprobs=[0.0] * 3, task="math")
    out = teacher.topk([empty, samples[2]], K)
    assert out[0].topk_ids.shape == (0, K) and out[1].topk_ids.shape == (samples[2].num_loss_tokens, K)
    assert teacher.vocab() == tiny_tokenizer.get_vocab()


def test_unknown_option_is_rejected(tiny_model_dirs):
    with pytest.raises(ValueError, match="valid"):
        make_teacher(tiny_model_dirs["teacher"], options={"devise": "cpu"})


def test_in_place_logsumexp_matches_torch_and_gives_minus_inf_for_rows_without_mass():
    logits = torch.randn(5, 300, dtype=torch.float64) * 20
    logits[1, :] = float("-inf")  # a row with no mass: -inf, as torch.logsumexp gives, not NaN
    logits[2, 7:] = float("-inf")
    want = torch.logsumexp(logits, dim=-1, keepdim=True)
    got = logsumexp_(logits.clone())
    assert got.shape == (5, 1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_topk_from_hidden_equals_log_softmax_of_the_head(softcap):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=False)
    hidden, targets = torch.randn(11, 16), torch.randint(0, 97, (11,))
    with torch.inference_mode():
        ids, vals, sampled = topk_from_hidden(hidden, head, targets, 5, chunk_size=4, softcap=softcap)
        logits = head(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logp = torch.log_softmax(logits, dim=-1)
    want_vals, want_ids = logp.topk(5, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(vals, want_vals, atol=1e-5, rtol=0)
    torch.testing.assert_close(sampled, logp.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5, rtol=0)
