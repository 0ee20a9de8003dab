"""Sampling and the HF policy: top-p/top-k truncation, behaviour log-probs, greedy, seeds, left padding, eos."""
from __future__ import annotations

import math

import pytest
import torch

from opd_agents import sampling
from opd_agents.config import ModelConfig, RolloutConfig
from opd_agents.rollout import SamplingParams, build_policy, processed_logprobs, sample_step
from opd_agents.rollout.chat import ChatEncoder
from opd_agents.rollout.hf_policy import HFPolicy
from opd_agents.sampling import NUCLEUS_PROBES, StepSampler
from tests.rollout.test_toyenv import add_logit_bias, make_policy, sharp_model


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    enc = ChatEncoder(tiny_tokenizer)
    return [enc.prompt_ids([{"role": "user", "content": "What is 12 + 35?"}]),
            enc.prompt_ids([{"role": "user", "content": "go to countertop 1"}]),
            enc.prompt_ids([{"role": "system", "content": "You are in a room."}, {"role": "user", "content": "hi"}])]


@pytest.fixture(scope="module")
def policy(tiny_model_dirs, tiny_tokenizer) -> HFPolicy:
    return make_policy(tiny_model_dirs["student"], tiny_tokenizer)


def test_processed_logprobs_matches_brute_force_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=0.7, top_p=0.8)
    got = processed_logprobs(logits, params)[0]
    probs = torch.softmax(logits[0] / 0.7, -1)
    keep, mass = [], 0.0
    for i in torch.argsort(probs, descending=True).tolist():  # the smallest sorted prefix reaching top_p
        keep.append(i)
        mass += probs[i].item()
        if mass >= 0.8:
            break
    expected = torch.full_like(probs, float("-inf"))
    expected[keep] = torch.log(probs[keep] / probs[keep].sum())
    torch.testing.assert_close(got, expected)


def test_a_nucleus_among_equal_tokens_keeps_the_smallest_count_reaching_top_p():
    # Which of equal-probability tokens are kept is the partial sort's choice; how many and their mass are not.
    out = processed_logprobs(torch.zeros(1, 5), SamplingParams(top_p=0.8))[0]
    kept = out[torch.isfinite(out)]
    assert len(kept) == 4 and torch.allclose(kept, torch.full((4,), math.log(0.25)))


def _sorted_nucleus_drop(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: sort every row, keep the smallest prefix whose mass reaches top_p."""
    probs = torch.softmax(scores.double(), -1)
    drop = torch.ones_like(scores, dtype=torch.bool)
    for b, row in enumerate(probs):
        mass = 0.0
        for i in torch.argsort(row, descending=True).tolist():
            drop[b, i] = False
            mass += row[i].item()
            if mass >= top_p:
                break
    return drop


@pytest.mark.parametrize("std, probe", [(8.0, 0), (1.5, 1), (0.1, None)])
def test_the_nucleus_equals_a_full_sort_whichever_probe_holds_it(std, probe):
    vocab = 2 * NUCLEUS_PROBES[-1]
    scores = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * std  # peaked / wider / nearly flat
    kept = torch.isfinite(processed_logprobs(scores, SamplingParams(top_p=0.9)))
    # The widest row's nucleus fits the first probe that holds it (`probe`; None: only whole sorted rows hold it).
    sizes = (0, *NUCLEUS_PROBES, vocab)
    first = len(NUCLEUS_PROBES) if probe is None else probe
    assert sizes[first] < int(kept.sum(-1).max()) <= sizes[first + 1]
    assert torch.equal(~kept, _sorted_nucleus_drop(scores, 0.9))


def test_top_k_keeps_k_tokens_and_renormalises():
    out = processed_logprobs(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), SamplingParams(top_p=1.0, top_k=2))
    assert torch.isinf(out[0, [1, 3]]).all()
    assert math.isclose(out[0, [0, 2]].exp().sum().item(), 1.0, rel_tol=1e-6)


def test_greedy_step_is_argmax_with_zero_logprob():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids, lp = sample_step(logits, SamplingParams(greedy=True), None)
    assert ids.tolist() == logits.argmax(-1).tolist() and lp.tolist() == [0.0] * 4


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(top_p=1.0), [0.5, 0.0, 0.25, 0.15, 0.1, 0.0]),  # whole rows: the two-level draw
    (SamplingParams(top_p=1.0, top_k=3), [0.5 / 0.9, 0.0, 0.25 / 0.9, 0.15 / 0.9, 0.0, 0.0]),  # top-k candidates
    (SamplingParams(top_p=0.7), [2 / 3, 0.0, 1 / 3, 0.0, 0.0, 0.0]),  # the nucleus (V < any probe: sorted rows)
])
def test_draw_frequencies_match_the_distribution_and_skip_zero_mass(monkeypatch, params, expected):
    # Blocks of 4 tokens: V = 6 spans two blocks, the second padded, with a zero-mass token last.
    monkeypatch.setattr(sampling, "DRAW_BLOCK", 4)
    probs = torch.tensor([0.5, 0.0, 0.25, 0.15, 0.1, 0.0])
    n = 200_000
    ids, logp = sample_step(probs.log().expand(n, -1), params, torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=len(probs)).double()
    want = torch.tensor(expected, dtype=torch.float64)
    assert (counts[want == 0] == 0).all()  # zero-mass and cut tokens, including a trailing one, are never drawn
    se = (want * (1 - want) / n).sqrt()
    assert ((counts / n - want).abs() <= 5 * se + 1e-12).all(), counts / n
    torch.testing.assert_close(logp.double(), want.log()[ids], rtol=0, atol=1e-6)


def test_draw_is_reproducible_per_generator_seed():
    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(1))
    a, b = (sample_step(logits, SamplingParams(top_p=1.0), torch.Generator().manual_seed(3))[0] for _ in range(2))
    assert a.tolist() == b.tolist() and a.shape == (16,) and a.dtype == torch.long


@pytest.mark.parametrize("params", [SamplingParams(top_p=1.0), SamplingParams(top_p=0.9),
                                    SamplingParams(top_p=0.95, top_k=50, temperature=0.7)])
@pytest.mark.parametrize("std", [4.0, 1.5])  # nuclei of ~100 tokens (first probe) / 1-8k (sorted rows, 2nd probe)
def test_sampled_logprobs_equal_the_reference_at_the_drawn_ids_across_reused_buffers(params, std):
    gen = torch.Generator().manual_seed(2)
    sampler = StepSampler(params, torch.Generator().manual_seed(0))
    first = None
    # 3 blocks with a padded last one, then the same width with a shorter V (the padding must be cleared), then 20k.
    for vocab in (3000, 2500, 3000, 20_000):
        logits = torch.randn(8, vocab, generator=gen) * std
        ids, logp = sampler(logits)
        assert (ids < vocab).all()
        assert torch.equal(logp, processed_logprobs(logits, params).gather(-1, ids[:, None])[:, 0])
        first = sampler._buffer if first is None else first
        if vocab == 2500:
            assert sampler._buffer is first  # one buffer for every step of a batch of one width


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="greedy"):
        SamplingParams(temperature=0.0)


def test_top_p_on_a_peaked_model_only_ever_emits_the_top_token(tiny_model_dirs, tiny_tokenizer, prompts):
    model = sharp_model(tiny_model_dirs["student"])
    add_logit_bias(model, 50, 7.0, scale=0.0)  # p(token 50) = e^7 / (e^7 + V - 1) ≈ 0.77 everywhere
    policy = HFPolicy(model, tiny_tokenizer)
    nucleus = policy.generate(prompts, SamplingParams(top_p=0.5, max_new_tokens=12, seed=0))
    for gen in nucleus:
        assert gen.token_ids == [50] * 12 and gen.logprobs == [0.0] * 12
    free = policy.generate(prompts * 4, SamplingParams(top_p=1.0, max_new_tokens=12, seed=0))
    assert any(t != 50 for g in free for t in g.token_ids)
    assert all(lp < 0.0 for g in free for lp in g.logprobs)


def _full_forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_greedy_generation_equals_argmax_of_uncached_forward(policy, prompts):
    gen = policy.generate(prompts[:1], SamplingParams(greedy=True, max_new_tokens=10))[0]
    ids = list(prompts[0])
    for tok in gen.token_ids:
        assert tok == int(_full_forward_logits(policy.model, ids)[-1].argmax())
        ids.append(tok)


def test_behaviour_logprobs_are_those_of_the_truncated_distribution(policy, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=8, seed=1)
    for prompt, gen in zip(prompts, policy.generate(prompts, params)):
        logits = _full_forward_logits(policy.model, prompt + gen.token_ids)
        steps = logits[len(prompt) - 1: len(prompt) - 1 + len(gen.token_ids)]
        expected = processed_logprobs(steps, params).gather(-1, torch.tensor(gen.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible(policy, prompts):
    params = SamplingParams(max_new_tokens=10, seed=7)
    a, b = policy.generate(prompts, params), policy.generate(prompts, params)
    c = policy.generate(prompts, params.with_seed(8))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_left_padded_batch_equals_one_by_one(policy, prompts):
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    params = SamplingParams(greedy=True, max_new_tokens=15)
    batched = policy.generate(prompts, params)
    for prompt, gen in zip(prompts, batched):
        assert gen.token_ids == policy.generate([prompt], params)[0].token_ids


def test_eos_stops_each_row_and_is_kept(tiny_model_dirs, tiny_tokenizer, prompts):
    eos = tiny_tokenizer.eos_token_id
    policy = make_policy(tiny_model_dirs["student"], tiny_tokenizer, eos_bias=4.0)
    gens = policy.generate(prompts * 4, SamplingParams(top_p=1.0, max_new_tokens=20, seed=0))
    assert {g.finish_reason for g in gens} == {"stop", "length"}
    for g in gens:
        assert len(g.token_ids) == len(g.logprobs)
        if g.finish_reason == "stop":
            assert g.token_ids[-1] == eos and eos not in g.token_ids[:-1] and len(g.token_ids) <= 20
        else:
            assert eos not in g.token_ids and len(g.token_ids) == 20 and g.truncated


def test_load_state_dict_sets_version_and_rejects_foreign_weights(tiny_model_dirs, tiny_tokenizer, prompts):
    policy = make_policy(tiny_model_dirs["student"], tiny_tokenizer)
    other = sharp_model(tiny_model_dirs["student"], seed=5)
    params = SamplingParams(greedy=True, max_new_tokens=10)
    before = policy.generate(prompts, params)
    policy.load_state_dict(other.state_dict(), version=3)
    assert policy.version == 3
    assert [g.token_ids for g in policy.generate(prompts, params)] != [g.token_ids for g in before]
    with pytest.raises(ValueError, match="unexpected"):
        policy.load_state_dict({"bogus.weight": torch.zeros(1)}, version=4)


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_dirs, tiny_tokenizer):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed; this checks the message shown when it is not")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install -e .\\[vllm\\]"):
        build_policy(ModelConfig(path=str(tiny_model_dirs["student"])), RolloutConfig(backend="vllm"),
                     tiny_tokenizer, device="cpu")
